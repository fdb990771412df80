#!/usr/bin/env bash
# Runs the suite against DATABASE_URL (use scripts/test.sh to get a server started for you).
set -euo pipefail
cd "$(dirname "$0")/.."
: "${DATABASE_URL:?DATABASE_URL must be set; run scripts/test.sh instead}"
. scripts/lib/cargo-flags.sh
target="${CARGO_TARGET_DIR:-target}"
cargo test "${SUITE_FLAGS[@]}" "$@"
echo "== failover under load (a pg_auto_failover formation; FAULTS.md)"
# A formation of its own (Debian's pg_auto_failover packages installed when missing), about
# 10 s to start (more on a loaded machine) and under a minute to run; its figures are printed (FAILOVER lines).
scripts/with-formation.sh cargo test "${SUITE_FLAGS[@]}" --test topologies -- --ignored --nocapture failover_under_load
# The same feature set as the tests: the fault suite and the examples reuse their build.
cargo build -q "${SUITE_FLAGS[@]}" --bins --examples
echo "== fault suite"
"$target/debug/apalis-pgmq-notify-faults" run
echo "== fault campaign: two minutes of random faults (FAULTS.md)"
# A random seed each run, printed first and on failure: replay with the command it prints. (The
# campaign's unit tests ran with cargo test above.) Every fault kind, blackholes and freezes
# included (FAULTS.md: "a worker stops claiming for good after its network loses a request",
# fixed by the statement deadlines).
"$target/debug/apalis-pgmq-notify-faults" campaign --minutes 2
echo "== fault campaign against a pg_auto_failover formation: two minutes (FAULTS.md)"
# Failovers, switchovers and killed primaries among worker kills and terminated sessions, every
# process on the formation's multi-host string (three data nodes, number_sync_standbys 1:
# scripts/with-formation.sh). About 10 s to start the formation; a random seed, printed.
scripts/with-formation.sh "$target/debug/apalis-pgmq-notify-faults" campaign --formation --minutes 2
for example in $(ls examples/*.rs 2>/dev/null | xargs -n1 basename | sed 's/\.rs$//'); do
  # The board serves until stopped: the browser check below runs it.
  [ "$example" = board ] && continue
  echo "== example: $example"
  timeout 300 "$target/debug/examples/$example"
done
echo "== board in a browser"
timeout 600 scripts/board-check.sh
echo "== all tests and examples passed"
