#!/usr/bin/env bash
# The fault suite (see FAULTS.md): worker processes killed, PostgreSQL restarted, connections
# terminated, poison messages, hostile names, panics, leases under load. Starts a throwaway
# PostgreSQL unless DATABASE_URL is set (then the restart scenarios are skipped).
#
#   scripts/faults.sh [--quick] [--only "name,name"]
#   scripts/faults.sh campaign [--minutes M] [--seed N] [--dir D]   # random faults (FAULTS.md)
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build -q -p apalis-pgmq-notify-faults
if [ "${1:-}" = campaign ]; then
  exec scripts/with-pg.sh cargo run -q -p apalis-pgmq-notify-faults -- "$@"
fi
exec scripts/with-pg.sh cargo run -q -p apalis-pgmq-notify-faults -- run "$@"
