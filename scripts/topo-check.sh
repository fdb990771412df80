#!/usr/bin/env bash
# Checks the production-topology scripts end to end with psql only (no Rust build): PgBouncer in
# both modes, a hot-standby replica, and a pg_auto_failover formation through a failover, a
# switchover, a crashed postgres and a killed node. Installs what is missing from Debian's
# packages (pgbouncer, pg_auto_failover), like the scripts it runs. About 1.5 to 2 minutes.
#
#   scripts/topo-check.sh [pgbouncer|replica|formation]...   (default: all three)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
parts=("$@")
[ "${#parts[@]}" -gt 0 ] || parts=(pgbouncer replica formation)

# The checks run inside the scripts' environments: each is a bash snippet with these helpers.
helpers='
set -euo pipefail
q() { psql "$1" -X -qAt -v ON_ERROR_STOP=1 "${@:2}"; }
expect() { # expect WHAT GOT WANT
  if [ "$2" != "$3" ]; then echo "FAIL: $1: got [$2], want [$3]" >&2; exit 1; fi
  echo "ok: $1"
}
sqlstate_of() { psql "$1" -X -qAt -v VERBOSITY=verbose -c "$2" 2>&1 | grep -oE "ERROR: +[0-9A-Z]{5}" | grep -oE "[0-9A-Z]{5}$" || true; }
'

for part in "${parts[@]}"; do
  t0=$(date +%s%3N)
  case "$part" in
    pgbouncer)
      echo "== PgBouncer (session and transaction pooling)"
      "$HERE/with-pgbouncer.sh" bash -c "$helpers"'
        expect "session mode answers" "$(q "$APALIS_PGBOUNCER_SESSION_URL" -c "SELECT 1")" 1
        expect "transaction mode answers" "$(q "$APALIS_PGBOUNCER_TRANSACTION_URL" -c "SELECT 1")" 1
        expect "APALIS_PGBOUNCER_URL is in transaction mode" \
          "$(q "$APALIS_PGBOUNCER_ADMIN_URL" -c "SHOW POOLS" | awk -F"|" -v db="$(basename "${APALIS_PGBOUNCER_URL%%\?*}")" "\$1 == db { print \$NF }")" transaction
        expect "writes through the pooler" \
          "$(q "$APALIS_PGBOUNCER_URL" -c "CREATE TABLE topo_check_bouncer (i int)" -c "INSERT INTO topo_check_bouncer VALUES (1) RETURNING i")" 1
        expect "session mode: a SET stays with its client" \
          "$(q "$APALIS_PGBOUNCER_SESSION_URL" -c "SET statement_timeout = 4321" -c "SHOW statement_timeout")" 4321ms
        expect "session mode: the next client starts clean (DISCARD ALL)" \
          "$(q "$APALIS_PGBOUNCER_SESSION_URL" -c "SHOW statement_timeout")" 0
        q "$APALIS_PGBOUNCER_TRANSACTION_URL" -c "SET statement_timeout = 4321"
        expect "transaction mode: the SET outlives its client on the server connection" \
          "$(q "$APALIS_PGBOUNCER_TRANSACTION_URL" -c "SHOW statement_timeout")" 4321ms
        q "$APALIS_PGBOUNCER_TRANSACTION_URL" -c "PREPARE topo_p AS SELECT 7" -c "EXECUTE topo_p" >/dev/null
        expect "transaction mode: a PREPAREd statement meets the next client" \
          "$(q "$APALIS_PGBOUNCER_TRANSACTION_URL" -c "EXECUTE topo_p")" 7
        expect "the direct URL is unchanged" "$(q "$DATABASE_URL" -c "SHOW port")" "$APALIS_PG_PORT"
      '
      ;;
    replica)
      echo "== hot-standby replica"
      "$HERE/with-replica.sh" bash -c "$helpers"'
        expect "pg_is_in_recovery() on the replica" "$(q "$APALIS_REPLICA_URL" -c "SELECT pg_is_in_recovery()")" t
        expect "a write on the replica" "$(sqlstate_of "$APALIS_REPLICA_URL" "CREATE TABLE nope (i int)")" 25006
        expect "LISTEN on the replica" "$(sqlstate_of "$APALIS_REPLICA_URL" "LISTEN apalis")" 25006
        q "$DATABASE_URL" -c "CREATE TABLE topo_check_replica (i int)" -c "INSERT INTO topo_check_replica VALUES (42)"
        seen=""
        for _ in $(seq 1 50); do
          seen=$(q "$APALIS_REPLICA_URL" -c "SELECT i FROM topo_check_replica" 2>/dev/null || true)
          [ "$seen" = 42 ] && break
          sleep 0.1
        done
        expect "a row written on the primary reaches the replica" "$seen" 42
      '
      ;;
    formation)
      echo "== pg_auto_failover formation"
      "$HERE/with-formation.sh" "$HERE/formation-ctl.sh" selftest
      ;;
    *) echo "unknown part '$part' (pgbouncer, replica, formation)" >&2; exit 2 ;;
  esac
  echo "   ($part: $(( ($(date +%s%3N) - t0) / 1000 )) s)"
done
echo "== topology checks passed"
