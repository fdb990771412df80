#!/usr/bin/env bash
# The whole test suite against a real PostgreSQL: unit, integration and doc tests, then every
# example run to completion. Starts a throwaway PostgreSQL unless DATABASE_URL is set.
#
# With the throwaway server, the suite also gets a hot-standby replica of it
# (scripts/with-replica.sh) and PgBouncer in front of it (scripts/with-pgbouncer.sh, Debian's
# pgbouncer installed when missing): tests/topologies.rs runs against them. With your own
# DATABASE_URL those tests say they are skipped, unless you wrap the command yourself:
#   scripts/with-replica.sh scripts/with-pgbouncer.sh --mode session -- scripts/run-tests.sh
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -n "${DATABASE_URL:-}" ]; then
  exec scripts/run-tests.sh "$@"
fi
exec scripts/with-pg.sh scripts/with-replica.sh scripts/with-pgbouncer.sh --mode session -- \
  scripts/run-tests.sh "$@"
