#!/usr/bin/env bash
# The whole test suite: unit tests, KVM integration tests, CLI tests, the
# service tests and the failover suite (printed, with its summary table).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo build --release --workspace --all-targets
cargo test --release --workspace --exclude castor-failover-tests 2>&1
# the networked guest's own crate (no_std staticlib, its own workspace): RESP,
# server and driver tests on the host
cargo test --release --manifest-path vmm/guest/net/Cargo.toml 2>&1
# end-to-end: real castor processes; --nocapture shows what each scenario did
cargo test --release -p castor-failover-tests --tests -- --nocapture --test-threads 1 2>&1
