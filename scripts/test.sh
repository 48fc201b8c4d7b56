#!/usr/bin/env bash
# The project's one test command: installs and starts whatever the tests
# need, then runs every test. Used as-is by .ci/run.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo test --all-targets --locked "$@"
