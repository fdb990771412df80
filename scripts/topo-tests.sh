#!/usr/bin/env bash
# The topology runs too long for the suite: a pg_auto_failover formation under load
# (failover, switchover, SIGKILLed postmaster), and the burn-down/pickup measurement through
# PgBouncer against direct. Both print their figures (lines starting FAILOVER / MEASURE).
#
#   scripts/topo-tests.sh             both
#   scripts/topo-tests.sh failover    only the formation
#   scripts/topo-tests.sh measure     only the measurement
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/cargo-flags.sh
what=${1:-all}
run() { cargo test "${SUITE_FLAGS[@]}" --test topologies -- --ignored --nocapture "$1"; }
if [ "$what" = all ] || [ "$what" = failover ]; then
  scripts/with-formation.sh bash -c "$(declare -f run); SUITE_FLAGS=(${SUITE_FLAGS[*]}); run failover_under_load"
fi
if [ "$what" = all ] || [ "$what" = measure ]; then
  scripts/with-pg.sh scripts/with-pgbouncer.sh --mode session -- \
    bash -c "$(declare -f run); SUITE_FLAGS=(${SUITE_FLAGS[*]}); run measure_burn_down"
fi
