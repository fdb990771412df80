#!/usr/bin/env bash
# The whole test suite against a real PostgreSQL: unit, integration and doc tests, then every
# example run to completion. Starts a throwaway PostgreSQL unless DATABASE_URL is set.
set -euo pipefail
cd "$(dirname "$0")/.."
exec scripts/with-pg.sh scripts/run-tests.sh "$@"
