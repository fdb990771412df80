#!/usr/bin/env bash
# Runs a command with PgBouncer in front of the PostgreSQL that DATABASE_URL points at.
#
#   scripts/with-pgbouncer.sh cargo test --test topologies
#   APALIS_PGBOUNCER_MODE=session scripts/with-pgbouncer.sh cargo test ...
#   scripts/with-pgbouncer.sh --mode session -- cargo test ...
#
# - DATABASE_URL unset: a throwaway PostgreSQL is started first, through scripts/with-pg.sh.
# - PgBouncer (Debian's `pgbouncer` package, installed when the binary is missing) is started as
#   an unprivileged user (it refuses root) on a free port on 127.0.0.1, in a temporary directory,
#   and stopped and deleted when the command ends. Its config and log are printed on failure.
# - Clients are trusted (auth_type=trust); PgBouncer logs in to PostgreSQL as the client's user,
#   with the password of DATABASE_URL if it has one.
#
# The command sees:
#   DATABASE_URL                       unchanged: direct to PostgreSQL (LISTEN, advisory locks)
#   APALIS_PGBOUNCER_URL               pooled, in the mode asked for (default: transaction)
#   APALIS_PGBOUNCER_SESSION_URL       pooled, pool_mode=session     (database alias <db>_session)
#   APALIS_PGBOUNCER_TRANSACTION_URL   pooled, pool_mode=transaction (database alias <db>_transaction)
#   APALIS_PGBOUNCER_ADMIN_URL         PgBouncer's admin console (SHOW POOLS, RECONNECT, PAUSE, KILL,
#                                      RESUME, RELOAD), as the same user
#   APALIS_PGBOUNCER_DATABASES_INI     a file of more [databases] entries (`alias = host=.. port=..
#                                      dbname=.. pool_mode=..`), included by the config: append
#                                      and RELOAD to reach databases created after the start
#   APALIS_PGBOUNCER_SERVER            `host=.. port=..` of the server, for those entries
#   APALIS_PGBOUNCER_MODE, APALIS_PGBOUNCER_PORT, APALIS_PGBOUNCER_INI, APALIS_PGBOUNCER_LOG,
#   APALIS_PGBOUNCER_PIDFILE           (a test may rewrite the .ini and RELOAD, e.g. to follow a
#                                      new primary)
#   APALIS_PGBOUNCER_USER              the user PgBouncer runs as: to restart it (`kill -TERM
#                                      $(cat pidfile)`, then `pgbouncer -d <ini>` as that user),
#                                      as the fault campaign does
#
# Options / environment:
#   --mode transaction|session | APALIS_PGBOUNCER_MODE   the mode of APALIS_PGBOUNCER_URL
#   APALIS_PGBOUNCER_POOL_SIZE=4      server connections per (database, user) pool: small, so that
#                                     concurrent clients really share server connections
#   APALIS_PGBOUNCER_IGNORE_STARTUP=extra_float_digits
#                                     startup parameters PgBouncer drops instead of refusing the
#                                     client ("unsupported startup parameter"); sqlx sends
#                                     extra_float_digits unless told not to. Set it empty to see.
#   APALIS_PGBOUNCER_EXTRA="k = v; k2 = v2"   more [pgbouncer] settings
#   APALIS_PGBOUNCER_PORT_BASE=56432  where the free-port search starts
#   APALIS_TOPO_KEEP=1                keep the temporary directory (config, logs)
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
TOPO_NAME=with-pgbouncer
# shellcheck source=lib/topo-common.sh
. "$HERE/lib/topo-common.sh"

MODE=${APALIS_PGBOUNCER_MODE:-transaction}
while [ "$#" -gt 0 ]; do
  case "$1" in
    --mode) MODE=$2; shift 2 ;;
    --mode=*) MODE=${1#--mode=}; shift ;;
    --) shift; break ;;
    *) break ;;
  esac
done
if [ "$#" -eq 0 ]; then
  echo "usage: $0 [--mode transaction|session] [--] <command> [args...]" >&2
  exit 2
fi
case "$MODE" in transaction|session) ;; *) topo_log "unknown mode '$MODE' (transaction or session)"; exit 2 ;; esac

if [ -z "${DATABASE_URL:-}" ]; then
  exec "$HERE/with-pg.sh" "$0" --mode "$MODE" -- "$@"
fi

if ! command -v pgbouncer >/dev/null 2>&1; then
  topo_apt_install pgbouncer || { topo_log "could not install pgbouncer"; exit 1; }
  command -v pgbouncer >/dev/null 2>&1 || { topo_log "no pgbouncer binary after installing"; exit 1; }
  # The package's own service is not wanted (policy-rc.d kept it from starting; belt and braces).
  if [ -x /etc/init.d/pgbouncer ]; then topo_as_root /etc/init.d/pgbouncer stop >/dev/null 2>&1 || true; fi
fi
command -v psql >/dev/null 2>&1 || { topo_log "psql is missing (Debian: postgresql-client)"; exit 1; }

topo_parse_url "$DATABASE_URL"
topo_pick_user

topo_free_port PORT "${APALIS_PGBOUNCER_PORT_BASE:-56432}" || exit 1
WORK=$(mktemp -d /tmp/apalis-pgbouncer.XXXXXX)
chmod 755 "$WORK"
INI="$WORK/pgbouncer.ini"
LOGFILE="$WORK/pgbouncer.log"
PIDFILE="$WORK/pgbouncer.pid"
DBS_INI="$WORK/databases.ini"
: >"$DBS_INI"

failed=1
cleanup() {
  local status=$?
  if [ -f "$PIDFILE" ]; then
    local pid
    pid=$(cat "$PIDFILE" 2>/dev/null || true)
    if [ -n "$pid" ]; then
      kill -INT "$pid" 2>/dev/null || true   # SIGINT: PgBouncer's immediate shutdown
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  if [ "$failed" -eq 1 ] && [ -f "$LOGFILE" ]; then
    topo_log "PgBouncer did not come up; its config and log ($WORK):"
    sed 's/^/  | /' "$INI" >&2 || true
    tail -n 50 "$LOGFILE" | sed 's/^/  | /' >&2 || true
  fi
  if [ "${APALIS_TOPO_KEEP:-0}" = 1 ]; then topo_log "kept $WORK"; else rm -rf "$WORK"; fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
keep_q=""; [ "${APALIS_TOPO_KEEP:-0}" = 1 ] || keep_q="rm -rf '$WORK'"
topo_reaper "[ -f '$PIDFILE' ] && kill -INT \$(cat '$PIDFILE') 2>/dev/null; sleep 2; [ -f '$PIDFILE' ] && kill -KILL \$(cat '$PIDFILE') 2>/dev/null; $keep_q"

# Server-side connection string: the client's user logs in, with DATABASE_URL's password if any.
SERVER="host=$URL_HOST port=$URL_PORT dbname=$URL_DB"
if [ -n "$URL_PASSWORD" ]; then SERVER="$SERVER password=$URL_PASSWORD"; fi
POOL_SIZE=${APALIS_PGBOUNCER_POOL_SIZE:-4}

{
  echo "[databases]"
  echo "$URL_DB = $SERVER pool_mode=$MODE"
  echo "${URL_DB}_session = $SERVER pool_mode=session"
  echo "${URL_DB}_transaction = $SERVER pool_mode=transaction"
  # More databases, added by tests (then RELOAD through the admin console).
  echo "%include $DBS_INI"
  echo
  echo "[pgbouncer]"
  echo "listen_addr = 127.0.0.1"
  echo "listen_port = $PORT"
  echo "unix_socket_dir = $WORK"
  echo "logfile = $LOGFILE"
  echo "pidfile = $PIDFILE"
  echo "auth_type = trust"
  echo "auth_file = $WORK/userlist.txt"
  echo "admin_users = $URL_USER"
  echo "stats_users = $URL_USER"
  echo "pool_mode = $MODE"
  echo "default_pool_size = $POOL_SIZE"
  echo "min_pool_size = 0"
  echo "reserve_pool_size = 0"
  echo "max_client_conn = 2000"
  echo "max_db_connections = 0"
  echo "ignore_startup_parameters = ${APALIS_PGBOUNCER_IGNORE_STARTUP-extra_float_digits}"
  # Quick to notice a dead server (failover tests); quick to give up on an unreachable one.
  echo "server_connect_timeout = 5"
  echo "server_login_retry = 1"
  echo "server_check_delay = 1"
  echo "query_wait_timeout = 30"
  echo "log_connections = 0"
  echo "log_disconnections = 0"
  echo "log_pooler_errors = 1"
  printf '%s\n' "${APALIS_PGBOUNCER_EXTRA:-}" | tr ';' '\n' | sed 's/^ *//'
} >"$INI"
printf '"%s" ""\n' "$URL_USER" >"$WORK/userlist.txt"
chown -R "$TOPO_USER" "$WORK"
chmod 600 "$INI" "$WORK/userlist.txt"
chmod 666 "$DBS_INI"

topo_run_as pgbouncer -d "$INI" >"$WORK/start.log" 2>&1 || { cat "$WORK/start.log" >&2; exit 1; }
ADMIN_URL="postgres://$URL_USER@127.0.0.1:$PORT/pgbouncer?sslmode=disable"
topo_wait_sql 20 "$ADMIN_URL" "SHOW VERSION" >/dev/null || exit 1

pooled_url() {
  local q="sslmode=disable"
  echo "postgres://$URL_USER${URL_PASSWORD:+:$URL_PASSWORD}@127.0.0.1:$PORT/$1?$q"
}
# A first query through each alias: PgBouncer really reaches the server.
for db in "$URL_DB" "${URL_DB}_session" "${URL_DB}_transaction"; do
  topo_wait_sql 20 "$(pooled_url "$db")" "SELECT 1" >/dev/null || exit 1
done
failed=0
topo_log "PgBouncer $(pgbouncer --version | head -1 | awk '{print $2}') on 127.0.0.1:$PORT ($MODE mode) in front of $URL_HOST:$URL_PORT"

export APALIS_PGBOUNCER_URL APALIS_PGBOUNCER_SESSION_URL APALIS_PGBOUNCER_TRANSACTION_URL \
  APALIS_PGBOUNCER_ADMIN_URL APALIS_PGBOUNCER_MODE APALIS_PGBOUNCER_PORT APALIS_PGBOUNCER_INI \
  APALIS_PGBOUNCER_LOG APALIS_PGBOUNCER_PIDFILE APALIS_PGBOUNCER_DATABASES_INI APALIS_PGBOUNCER_SERVER \
  APALIS_PGBOUNCER_USER
APALIS_PGBOUNCER_USER=$TOPO_USER
APALIS_PGBOUNCER_DATABASES_INI=$DBS_INI
APALIS_PGBOUNCER_SERVER="host=$URL_HOST port=$URL_PORT${URL_PASSWORD:+ password=$URL_PASSWORD}"
APALIS_PGBOUNCER_URL=$(pooled_url "$URL_DB")
APALIS_PGBOUNCER_SESSION_URL=$(pooled_url "${URL_DB}_session")
APALIS_PGBOUNCER_TRANSACTION_URL=$(pooled_url "${URL_DB}_transaction")
APALIS_PGBOUNCER_ADMIN_URL=$ADMIN_URL
APALIS_PGBOUNCER_MODE=$MODE
APALIS_PGBOUNCER_PORT=$PORT
APALIS_PGBOUNCER_INI=$INI
APALIS_PGBOUNCER_LOG=$LOGFILE
APALIS_PGBOUNCER_PIDFILE=$PIDFILE

set +e
"$@"
status=$?
set -e
exit "$status"
