#!/usr/bin/env bash
# The side-by-side benchmark (see BENCHMARKS.md). Builds the harness and the apalis-pgmq peer
# (its own dependency tree), then runs every system against one PostgreSQL.
#
#   scripts/bench.sh [--quick] [--systems a,b] [--workloads a,b] [--set key=value]
#                    [--baseline REV]
#
# --baseline REV builds this repository's harness as it was at commit REV (from `git archive`,
# in target/baseline) and runs it as the `baseline` system of the `growth` workload: this
# crate's burn-down then and now, in one run against one server. With --baseline-harness
# current, the crate at REV is built with today's harness (bench/), for workloads REV's
# harness did not have yet (`held_snapshot`); the harness uses only API both have.
#
# Without DATABASE_URL a throwaway cluster is started with durable settings (fsync and
# synchronous_commit on) and pg_stat_statements preloaded, so idle cost counts statements.
set -euo pipefail
cd "$(dirname "$0")/.."
args=()
baseline=""
harness="then"
while [ $# -gt 0 ]; do
  case "$1" in
    --baseline) baseline="$2"; shift 2 ;;
    --baseline-harness) harness="$2"; shift 2 ;;
    *) args+=("$1"); shift ;;
  esac
done
cargo build --release -q -p apalis-pgmq-notify-bench
(cd bench/pgmq-peer && cargo build --release -q)
peer_target="${CARGO_TARGET_DIR:-$PWD/bench/pgmq-peer/target}"
case "$peer_target" in /*) ;; *) peer_target="$PWD/bench/pgmq-peer/$peer_target" ;; esac
export APQ_PEER_BIN="$peer_target/release/apalis-pgmq-peer-bench"
if [ -n "$baseline" ]; then
  rev="$(git rev-parse --short "$baseline")"
  src="$PWD/target/baseline/src-$rev-$harness"
  if [ ! -f "$src/Cargo.toml" ]; then
    rm -rf "$src" && mkdir -p "$src"
    git archive "$rev" | tar -x -C "$src"
  fi
  # Cargo decides what to rebuild by modification times, and target/baseline/target is shared by
  # every baseline: with the commit's times (or an earlier extraction's), this revision's sources
  # look older than the last baseline built there, and that baseline's binary would run under
  # this one's name. Touched, the workspace's crates are built again from these sources.
  find "$src" -type f -exec touch {} +
  if [ "$harness" = current ]; then
    rm -rf "$src/bench/src" && cp -r bench/src "$src/bench/src" && cp bench/Cargo.toml "$src/bench/"
  fi
  (cd "$src" && CARGO_TARGET_DIR="$PWD/../target" cargo build --release -q -p apalis-pgmq-notify-bench)
  export APQ_BASELINE_BIN="$PWD/target/baseline/target/release/apalis-pgmq-notify-bench"
  export APQ_BASELINE_REV="$rev"
fi
export APALIS_PG_DURABLE="${APALIS_PG_DURABLE:-1}"
export APALIS_PG_OPTS="-c shared_preload_libraries=pg_stat_statements ${APALIS_PG_OPTS:-}"
exec scripts/with-pg.sh cargo run --release -q -p apalis-pgmq-notify-bench -- "${args[@]}"
