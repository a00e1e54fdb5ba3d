#!/usr/bin/env bash
# Installs what castor's build and tests need on a fresh machine (Debian, as root):
# gcc and binutils build the built-in guest; protoc builds the etcd client;
# Debian's etcd-server is the witness the tests and the demo start on
# loopback; iproute2 makes the network namespaces, bridges and TAPs of the
# networked guest's tests and demo, and redis-tools' redis-benchmark and
# redis-cli are its clients; /dev/kvm must exist.
set -euo pipefail
need=()
command -v gcc >/dev/null 2>&1 || need+=(gcc)
command -v objcopy >/dev/null 2>&1 || need+=(binutils)
command -v protoc >/dev/null 2>&1 || need+=(protobuf-compiler)
command -v etcd >/dev/null 2>&1 || need+=(etcd-server)
command -v ip >/dev/null 2>&1 || need+=(iproute2)
command -v redis-benchmark >/dev/null 2>&1 || need+=(redis-tools)
command -v cargo >/dev/null 2>&1 || { echo "castor: cargo (Rust toolchain) is required" >&2; exit 1; }
if [ ${#need[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "castor: installing ${need[*]}" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq </dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need[@]}" </dev/null
  else
    echo "castor: please install ${need[*]} (gcc and binutils build the built-in guest, protobuf-compiler the etcd client; etcd-server is the witness, iproute2 and redis-tools the networked guest's tests)" >&2
    exit 1
  fi
fi
if [ ! -c /dev/kvm ]; then
  echo "castor: /dev/kvm is missing: castor needs KVM" >&2
  exit 1
fi
