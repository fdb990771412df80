#!/usr/bin/env bash
# The side-by-side benchmark (see BENCHMARKS.md). Builds the harness and the apalis-pgmq peer
# (its own dependency tree), then runs every system against one PostgreSQL.
#
#   scripts/bench.sh [--quick] [--systems a,b] [--workloads a,b]
#
# Without DATABASE_URL a throwaway cluster is started with durable settings (fsync and
# synchronous_commit on) and pg_stat_statements preloaded, so idle cost counts statements.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --release -q -p apalis-pgmq-notify-bench
(cd bench/pgmq-peer && cargo build --release -q)
peer_target="${CARGO_TARGET_DIR:-$PWD/bench/pgmq-peer/target}"
case "$peer_target" in /*) ;; *) peer_target="$PWD/bench/pgmq-peer/$peer_target" ;; esac
export APQ_PEER_BIN="$peer_target/release/apalis-pgmq-peer-bench"
export APALIS_PG_DURABLE="${APALIS_PG_DURABLE:-1}"
export APALIS_PG_OPTS="-c shared_preload_libraries=pg_stat_statements ${APALIS_PG_OPTS:-}"
exec scripts/with-pg.sh cargo run --release -q -p apalis-pgmq-notify-bench -- "$@"
