#!/usr/bin/env bash
# The whole test suite: unit tests, KVM integration tests, CLI tests.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/deps.sh
cargo build --release --workspace --all-targets
cargo test --release --workspace 2>&1
