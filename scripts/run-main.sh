#!/usr/bin/env bash
# castor's main job on its built-in default guest: `castor demo` starts a
# secondary and a primary on loopback with the kv guest and a client load,
# kills the primary halfway, shows the failover and the clients carrying on,
# and ends with a summary (add --json for a machine-readable last line).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
exec cargo run --release -q -p castor -- demo "$@"
