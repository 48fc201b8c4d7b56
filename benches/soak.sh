#!/usr/bin/env bash
# Chaos soak, the long version (not in CI; CI runs the same test, 60 s of
# chaos, under `cargo test`): the release build of tests/soak.rs runs the
# real daemon in front of tcp echo, HTTP and redis-server backends under
# client load for $1 seconds (default 600) while backends are SIGKILLed
# and revived (Redis also frozen with SIGSTOP), the config is reloaded
# (backends added, removed, reweighted, an invalid file now and then) and
# backends are drained through the admin API. It prints a table of what
# happened and the invariants (zero lost connections, whole HTTP
# responses, RSS and fds back within 10 % of the baseline, no unexpected
# error line), and exits non-zero if one fails.
#
# Needs redis-server (bash scripts/test.sh installs it). The seed is
# printed; SWITCHYARD_SOAK_SEED=<seed> bash benches/soak.sh repeats a run's
# choices.
#
#   bash benches/soak.sh          # 600 s
#   bash benches/soak.sh 3600     # an hour
set -euo pipefail
cd "$(dirname "$0")/.."
export SWITCHYARD_SOAK_SECS="${1:-600}"
exec cargo test --release --locked --test soak
