#!/usr/bin/env bash
# Runs a command with a hot-standby read replica of the PostgreSQL that DATABASE_URL points at.
#
#   scripts/with-replica.sh cargo test --test replica
#
# - DATABASE_URL unset: a throwaway PostgreSQL is started first, through scripts/with-pg.sh.
# - The replica is plain streaming replication: `pg_basebackup -R -X stream` into a temporary
#   directory (so standby.signal and primary_conninfo are written), started with hot_standby=on
#   as an unprivileged user on a free port on 127.0.0.1, and stopped and deleted when the command
#   ends. The primary must allow replication connections from 127.0.0.1 for DATABASE_URL's user
#   (with-pg.sh's cluster does: initdb --auth=trust) and have max_wal_senders > 0 and a free
#   replication slot (max_replication_slots > 0).
# - The standby streams through a physical replication slot of its own (apalis_replica_<port>),
#   so the primary keeps every WAL segment until the standby has it: a standby that falls behind
#   while the test suite writes gigabytes catches up later instead of stopping for good with
#   "requested WAL segment has already been removed". The slot is dropped when the command ends.
# - The server binaries must be of the primary's major version; Debian's postgresql-<major> is
#   installed when they are missing.
#
# The command sees DATABASE_URL unchanged, and:
#   APALIS_REPLICA_URL        the standby (read-only: writes fail with SQLSTATE 25006,
#                             read_only_sql_transaction; pg_is_in_recovery() is true)
#   APALIS_REPLICA_PORT, APALIS_REPLICA_DATADIR, APALIS_REPLICA_LOG, APALIS_REPLICA_BINDIR,
#   APALIS_REPLICA_USER       to stop, restart or promote it (pg_ctl promote -D ...)
#
# Environment:
#   APALIS_REPLICA_PORT_BASE=58432   where the free-port search starts
#   APALIS_REPLICA_OPTS="..."        extra `postgres` options for the standby
#   APALIS_TOPO_KEEP=1               keep the temporary directory
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
TOPO_NAME=with-replica
# shellcheck source=lib/topo-common.sh
. "$HERE/lib/topo-common.sh"

if [ "$#" -eq 0 ]; then
  echo "usage: $0 <command> [args...]" >&2
  exit 2
fi
if [ -z "${DATABASE_URL:-}" ]; then
  exec "$HERE/with-pg.sh" "$0" "$@"
fi
command -v psql >/dev/null 2>&1 || { topo_log "psql is missing (Debian: postgresql-client)"; exit 1; }
topo_parse_url "$DATABASE_URL"

# Settings a hot standby must match or exceed (it refuses to start otherwise), and the version.
primary_sql() { psql "$DATABASE_URL" -X -qAt -v ON_ERROR_STOP=1 -c "$1"; }
MAJOR=$(primary_sql "SELECT current_setting('server_version_num')::int / 10000")
BINDIR=$(topo_find_pg_bindir "$MAJOR" || true)
if [ -z "$BINDIR" ]; then
  topo_apt_install "postgresql-$MAJOR" || { topo_log "could not install postgresql-$MAJOR"; exit 1; }
  BINDIR=$(topo_find_pg_bindir "$MAJOR") || { topo_log "no PostgreSQL $MAJOR server binaries"; exit 1; }
fi
MATCH_OPTS=""
for s in max_connections max_worker_processes max_wal_senders max_prepared_transactions max_locks_per_transaction; do
  MATCH_OPTS="$MATCH_OPTS -c $s=$(primary_sql "SHOW $s")"
done
[ "$(primary_sql "SHOW wal_level")" != minimal ] || { topo_log "the primary has wal_level=minimal: no streaming replication"; exit 1; }
topo_pick_user

topo_free_port PORT "${APALIS_REPLICA_PORT_BASE:-58432}" || exit 1
WORK=$(mktemp -d /tmp/apalis-replica.XXXXXX)
chmod 755 "$WORK"
DATA="$WORK/data"
LOGFILE="$WORK/postgres.log"
chown -R "$TOPO_USER" "$WORK"

SLOT="apalis_replica_$PORT"
drop_slot_q="SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots WHERE slot_name = '$SLOT'"
started=0
failed=1
cleanup() {
  local status=$?
  if [ "$started" -eq 1 ]; then
    topo_run_as "$BINDIR/pg_ctl" -D "$DATA" -m immediate -w stop >/dev/null 2>&1 || true
  fi
  # Once the standby is stopped its slot is inactive and can go; left behind, it would keep
  # the primary's WAL forever.
  psql "$DATABASE_URL" -X -qAt -c "$drop_slot_q" >/dev/null 2>&1 || true
  if [ "$failed" -eq 1 ]; then
    topo_log "the replica did not come up; logs in $WORK:"
    for f in "$WORK"/*.log; do [ -f "$f" ] && { echo "  == $f" >&2; tail -n 40 "$f" | sed 's/^/  | /' >&2; }; done
  elif [ "$status" -ne 0 ] && [ -f "$LOGFILE" ]; then
    # The command failed: what the standby said (a replication that stopped, a replay that
    # waited on a conflict) is part of why.
    topo_log "the command failed (exit $status); the end of the replica's log:"
    tail -n 60 "$LOGFILE" | sed 's/^/  | /' >&2
  fi
  if [ "${APALIS_TOPO_KEEP:-0}" = 1 ]; then topo_log "kept $WORK"; else rm -rf "$WORK"; fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
keep_q=""; [ "${APALIS_TOPO_KEEP:-0}" = 1 ] || keep_q="rm -rf '$WORK'"
if [ "$(id -u)" -eq 0 ]; then stop_q="runuser -u '$TOPO_USER' --"; else stop_q=""; fi
topo_reaper "[ -f '$DATA/postmaster.pid' ] && $stop_q '$BINDIR/pg_ctl' -D '$DATA' -m immediate -w stop; psql '$DATABASE_URL' -X -qAt -c \"$drop_slot_q\" >/dev/null 2>&1; $keep_q"

T0=$(topo_now_ms)
# -R writes standby.signal and primary_conninfo; -X stream copies the WAL the backup needs;
# --checkpoint=fast starts at once instead of waiting for the primary's next checkpoint;
# --create-slot --slot makes the slot and writes primary_slot_name beside primary_conninfo.
topo_run_as env PGPASSWORD="$URL_PASSWORD" "$BINDIR/pg_basebackup" -h "$URL_HOST" -p "$URL_PORT" \
  -U "$URL_USER" -D "$DATA" -R -X stream --checkpoint=fast --no-sync --create-slot --slot="$SLOT" \
  >"$WORK/basebackup.log" 2>&1 || { topo_log "pg_basebackup failed"; exit 1; }
chmod 700 "$DATA"

OPTS="-p $PORT -k $WORK -c listen_addresses=127.0.0.1 -c hot_standby=on -c ssl=off$MATCH_OPTS"
# The throwaway primary trades durability for speed; so does its replica.
OPTS="$OPTS -c fsync=off -c full_page_writes=off ${APALIS_REPLICA_OPTS:-}"
started=1
topo_run_as "$BINDIR/pg_ctl" -D "$DATA" -l "$LOGFILE" -w -t 60 -o "$OPTS" start >/dev/null \
  || { topo_log "the standby did not start"; exit 1; }

REPLICA_URL="postgres://$URL_USER${URL_PASSWORD:+:$URL_PASSWORD}@127.0.0.1:$PORT/$URL_DB?sslmode=disable"
# Ready: it answers, is in recovery, and streams from the primary.
topo_wait_true 60 "$REPLICA_URL" "SELECT pg_is_in_recovery()" || exit 1
topo_wait_true 60 "$REPLICA_URL" "SELECT EXISTS (SELECT FROM pg_stat_wal_receiver WHERE status = 'streaming')" || exit 1
failed=0
topo_log "hot standby of $URL_HOST:$URL_PORT on 127.0.0.1:$PORT, streaming, in $(( $(topo_now_ms) - T0 )) ms"

export APALIS_REPLICA_URL=$REPLICA_URL APALIS_REPLICA_PORT=$PORT APALIS_REPLICA_DATADIR=$DATA \
  APALIS_REPLICA_LOG=$LOGFILE APALIS_REPLICA_BINDIR=$BINDIR APALIS_REPLICA_USER=$TOPO_USER

set +e
"$@"
status=$?
set -e
exit "$status"
