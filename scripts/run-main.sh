#!/usr/bin/env bash
# castor's main job on its built-in default guest: `castor demo` starts a
# secondary and a primary with the networked redis guest (its TAPs on a
# bridge in a network namespace of the demo's own; root needed), drives it
# with redis-benchmark and 64 persistent client connections, kills the
# primary halfway, shows the failover and the connections carrying on, and
# ends with a summary (add --json for a machine-readable last line;
# --guest kv for the kv guest and castor's own clients).
#
# The build is the one scripts/test.sh makes (same command, so the test
# suite afterwards reuses it); its progress shows (about 5 minutes on 2 cores
# the first time).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
echo "castor: building (release; progress below)" >&2
cargo build --release --workspace --all-targets
exec target/release/castor demo "$@"
