#!/usr/bin/env bash
# The fault suite (see FAULTS.md): worker processes killed, PostgreSQL restarted, connections
# terminated, poison messages, hostile names, panics, leases under load. Starts a throwaway
# PostgreSQL unless DATABASE_URL is set (then the restart scenarios are skipped).
#
#   scripts/faults.sh [--quick] [--only "name,name"]
#   scripts/faults.sh campaign [--minutes M] [--seed N] [--dir D]   # random faults (FAULTS.md)
#   scripts/faults.sh campaign --formation [--minutes M] ...        # the same against a
#       pg_auto_failover formation (scripts/with-formation.sh), with failovers
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/cargo-flags.sh
cargo build -q "${SUITE_FLAGS[@]}" --bins
faults="${CARGO_TARGET_DIR:-target}/debug/apalis-pgmq-notify-faults"
if [ "${1:-}" = campaign ]; then
  for a in "$@"; do
    if [ "$a" = --formation ]; then
      exec scripts/with-formation.sh "$faults" "$@"
    fi
  done
  exec scripts/with-pg.sh "$faults" "$@"
fi
exec scripts/with-pg.sh "$faults" run "$@"
