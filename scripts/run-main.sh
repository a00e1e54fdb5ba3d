#!/usr/bin/env bash
# castor's main job on its built-in default guest. Until the replicated service
# (issue 4) lands, this runs the kv guest unprotected for 10 s with a client load,
# collecting its dirty set every 10 ms, and prints live stats.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
exec cargo run --release -q -p castor -- run --guest kv --seconds 10 "$@"
