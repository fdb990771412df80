#!/usr/bin/env bash
# The quickstart demo, end to end. Starts a throwaway PostgreSQL unless DATABASE_URL is set.
set -euo pipefail
cd "$(dirname "$0")/.."
exec scripts/with-pg.sh cargo run --quiet --example quickstart
