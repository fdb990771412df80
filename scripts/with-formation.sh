#!/usr/bin/env bash
# Runs a command beside a pg_auto_failover formation: a monitor, a primary and two synchronous
# secondaries (number_sync_standbys = 1), all on this machine.
#
#   scripts/with-formation.sh cargo test --test failover
#   scripts/with-formation.sh scripts/formation-ctl.sh selftest     # bring-up and failover timings
#
# - Debian's `postgresql-<major>-auto-failover` and `pg-auto-failover-cli` (pg_auto_failover 2.0)
#   are installed when pg_autoctl or the extension is missing; PostgreSQL itself too, as with-pg.sh
#   does.
# - Four `pg_autoctl ... --run` services (monitor, node1, node2, node3) run as an unprivileged user
#   (pg_autoctl and PostgreSQL refuse root), each in its own session, on free ports on 127.0.0.1,
#   with every file (PGDATA, pg_autoctl's XDG config/state/pid files, logs) in one temporary
#   directory. All are stopped and the directory deleted when the command ends; the logs are
#   printed when the formation does not come up.
# - node1 is created first and becomes the primary; node2 and node3 are cloned from it and become
#   its synchronous standbys (replication-quorum true), and the formation's number_sync_standbys
#   is set to 1: the primary's synchronous_standby_names is `ANY 1 (pgautofailover_standby_2,
#   pgautofailover_standby_3)`, so a commit it acknowledges is on a standby.
# - Why three data nodes: with a single standby (number_sync_standbys 0, the only value two
#   nodes allow), pg_auto_failover keeps writes available when the standby is unhealthy by
#   putting the primary in `wait_primary`, synchronous replication off. It does so during a
#   `perform failover` too (the standby in prepare_promotion no longer counts), and the commits
#   acknowledged in that window are lost when the standby is promoted: the formation campaign
#   lost 46 acknowledged pushes that way (FAULTS.md). With number_sync_standbys 1 the monitor
#   does not do that when a standby is lost or promoted: writes wait for a standby instead.
#   One window is left: a newly promoted primary runs in `wait_primary`, synchronous
#   replication off, until a standby reattaches (seconds); a second failure inside it can lose
#   what it acknowledged there.
#   APALIS_FORMATION_NODES=2 starts the two-node formation (that trade included).
# - DATABASE_URL is left alone: this formation is separate from with-pg.sh's server.
#
# The command sees:
#   APALIS_FORMATION_URL        the formation's multi-host URI (`pg_autoctl show uri --formation
#                               default`) with the user added: postgres://postgres@127.0.0.1:P1,
#                               127.0.0.1:P2/postgres?target_session_attrs=read-write&sslmode=prefer
#   APALIS_FORMATION_NODE1_URL, APALIS_FORMATION_NODE2_URL, APALIS_FORMATION_NODE3_URL
#                               each node directly (NODE3 only with three nodes)
#   APALIS_FORMATION_MONITOR_URL                             the monitor (pg_auto_failover db)
#   APALIS_FORMATION_CTL        scripts/formation-ctl.sh: failover, switchover, kill-node,
#                               kill-postgres, start-node, wait-stable, wait-writable, primary,
#                               state, ... (see that script); it finds the formation through
#   APALIS_FORMATION_DIR        the temporary directory (formation.env there has every setting)
#
# Environment:
#   APALIS_FORMATION_FAST=1      (default) monitor and keeper timeouts short enough for tests
#                                (see FAST_SETTINGS below); 0 keeps pg_auto_failover's defaults.
#   APALIS_FORMATION_NODES       data nodes: 3 (default) or 2 (see above)
#   APALIS_FORMATION_PORT_BASE   where the free-port search starts (default 57432)
#   APALIS_TOPO_KEEP=1           keep the temporary directory
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
TOPO_NAME=with-formation
# shellcheck source=lib/topo-common.sh
. "$HERE/lib/topo-common.sh"

if [ "$#" -eq 0 ]; then
  echo "usage: $0 <command> [args...]" >&2
  exit 2
fi
T0=$(topo_now_ms)

# --- packages --------------------------------------------------------------------------------
BINDIR=$(topo_find_pg_bindir || true)
if [ -z "$BINDIR" ]; then
  topo_apt_install postgresql postgresql-contrib || { topo_log "could not install postgresql"; exit 1; }
  BINDIR=$(topo_find_pg_bindir) || { topo_log "no PostgreSQL server binaries after installing"; exit 1; }
fi
MAJOR=$("$BINDIR/postgres" --version | grep -oE '[0-9]+' | head -1)
if ! command -v pg_autoctl >/dev/null 2>&1 \
   || [ ! -e "/usr/share/postgresql/$MAJOR/extension/pgautofailover.control" ]; then
  topo_apt_install "postgresql-$MAJOR-auto-failover" pg-auto-failover-cli \
    || { topo_log "could not install pg_auto_failover for PostgreSQL $MAJOR"; exit 1; }
fi
command -v psql >/dev/null 2>&1 || { topo_log "psql is missing (Debian: postgresql-client)"; exit 1; }
topo_pick_user

# --- layout ----------------------------------------------------------------------------------
PORT_BASE=${APALIS_FORMATION_PORT_BASE:-57432}
topo_free_port MONITOR_PORT "$PORT_BASE" || exit 1
topo_free_port NODE1_PORT "$PORT_BASE" || exit 1
topo_free_port NODE2_PORT "$PORT_BASE" || exit 1
NODES=${APALIS_FORMATION_NODES:-3}
case "$NODES" in
  2) NODE3_PORT= ;;
  3) topo_free_port NODE3_PORT "$PORT_BASE" || exit 1 ;;
  *) topo_log "APALIS_FORMATION_NODES must be 2 or 3, not '$NODES'"; exit 2 ;;
esac
WORK=$(mktemp -d /tmp/apalis-formation.XXXXXX)
chmod 755 "$WORK"
mkdir -p "$WORK/config" "$WORK/share" "$WORK/run" "$WORK/logs" "$WORK/sock"
chown -R "$TOPO_USER" "$WORK"

# Everything the control script needs, in one sourceable file.
cat >"$WORK/formation.env" <<EOF
FORMATION_DIR='$WORK'
FORMATION_USER='$TOPO_USER'
FORMATION_BINDIR='$BINDIR'
FORMATION_MONITOR_PORT=$MONITOR_PORT
FORMATION_NODE1_PORT=$NODE1_PORT
FORMATION_NODE2_PORT=$NODE2_PORT
FORMATION_NODE3_PORT=$NODE3_PORT
FORMATION_NODES=$NODES
export XDG_CONFIG_HOME='$WORK/config' XDG_DATA_HOME='$WORK/share' XDG_RUNTIME_DIR='$WORK/run'
export PG_CONFIG='$BINDIR/pg_config' PATH='$BINDIR':"\$PATH" PGHOST='$WORK/sock' PG_REGRESS_SOCK_DIR='$WORK/sock'
FORMATION_MONITOR_URL='postgres://autoctl_node@127.0.0.1:$MONITOR_PORT/pg_auto_failover?sslmode=disable'
FORMATION_MONITOR_SU_URL='postgres://$TOPO_USER@127.0.0.1:$MONITOR_PORT/pg_auto_failover?sslmode=disable'
EOF
chmod 644 "$WORK/formation.env"
export APALIS_FORMATION_DIR=$WORK
CTL="$HERE/formation-ctl.sh"

failed=1
cleanup() {
  local status=$?
  trap - EXIT INT TERM
  if [ "$failed" -eq 1 ]; then
    topo_log "the formation did not come up; its logs ($WORK/logs):"
    for f in "$WORK"/logs/*.log; do
      [ -f "$f" ] || continue
      echo "  == $f" >&2
      tail -n 40 "$f" | sed 's/^/  | /' >&2
    done
  fi
  "$CTL" stop-all >/dev/null 2>&1 || true
  if [ "${APALIS_TOPO_KEEP:-0}" = 1 ]; then topo_log "kept $WORK"; else rm -rf "$WORK"; fi
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM
keep_q=""; [ "${APALIS_TOPO_KEEP:-0}" = 1 ] || keep_q="rm -rf '$WORK'"
topo_reaper "[ -d '$WORK' ] && APALIS_FORMATION_DIR='$WORK' '$CTL' stop-all; $keep_q"

# --- monitor ---------------------------------------------------------------------------------
"$CTL" spawn monitor create monitor --pgdata "$WORK/monitor" --pgport "$MONITOR_PORT" \
  --hostname 127.0.0.1 --listen 127.0.0.1 --auth trust --no-ssl --ssl-mode disable --run
# shellcheck disable=SC1091
. "$WORK/formation.env"
MONITOR_URL=$FORMATION_MONITOR_URL
MONITOR_SU_URL=$FORMATION_MONITOR_SU_URL
# The monitor is ready once its extension answers (pg_autoctl creates it after initdb).
topo_wait_sql 60 "$MONITOR_URL" "SELECT count(*) FROM pgautofailover.formation" >/dev/null \
  || { topo_log "the monitor did not come up"; exit 1; }
T_MONITOR=$(topo_now_ms)

# Short health checks and timeouts, so that a lost primary is replaced in seconds, not a minute.
# All are PGC_SIGHUP settings of the pgautofailover extension: a reload applies them.
FAST_SETTINGS="
pgautofailover.health_check_period = 1000
pgautofailover.health_check_timeout = 1000
pgautofailover.health_check_max_retries = 1
pgautofailover.health_check_retry_delay = 500
pgautofailover.node_considered_unhealthy_timeout = 2000
pgautofailover.primary_demote_timeout = 3000
pgautofailover.startup_grace_period = 1000
"
if [ "${APALIS_FORMATION_FAST:-1}" = 1 ]; then
  sql=()
  while read -r name _ value; do
    [ -n "$name" ] && sql+=(-c "ALTER SYSTEM SET $name = $value")
  done <<<"$FAST_SETTINGS"
  psql "$MONITOR_SU_URL" -X -q -v ON_ERROR_STOP=1 "${sql[@]}" -c "SELECT pg_reload_conf()" >/dev/null
fi

APALIS_FORMATION_NODE1_URL="postgres://$TOPO_USER@127.0.0.1:$NODE1_PORT/postgres?sslmode=disable"
APALIS_FORMATION_NODE2_URL="postgres://$TOPO_USER@127.0.0.1:$NODE2_PORT/postgres?sslmode=disable"
APALIS_FORMATION_NODE3_URL=
[ "$NODES" = 3 ] && APALIS_FORMATION_NODE3_URL="postgres://$TOPO_USER@127.0.0.1:$NODE3_PORT/postgres?sslmode=disable"

# --- nodes -----------------------------------------------------------------------------------
create_node() {
  local name=$1 port=$2
  # Create without --run, so the keeper's own timeouts can be set before it starts.
  "$CTL" as-user pg_autoctl create postgres --pgdata "$WORK/$name" --pgport "$port" \
    --pghost "$WORK/sock" --listen 127.0.0.1 --hostname 127.0.0.1 --name "$name" \
    --dbname postgres --monitor "$MONITOR_URL" --auth trust --no-ssl --ssl-mode disable \
    --replication-quorum true --candidate-priority 50 \
    >"$WORK/logs/$name-create.log" 2>&1 \
    || { topo_log "pg_autoctl create postgres ($name) failed"; cat "$WORK/logs/$name-create.log" >&2; return 1; }
  if [ "${APALIS_FORMATION_FAST:-1}" = 1 ]; then
    # The primary steps down by itself when it has lost both the monitor and its standby for this
    # long; kept below primary_demote_timeout (3 s), after which the monitor promotes the standby.
    "$CTL" as-user pg_autoctl config set --pgdata "$WORK/$name" timeout.network_partition_timeout 2 >/dev/null
    # A killed postgres is restarted by its keeper; after this long the monitor is told it is down.
    "$CTL" as-user pg_autoctl config set --pgdata "$WORK/$name" timeout.postgresql_restart_failure_timeout 5 >/dev/null
  fi
  "$CTL" start-node "$name"
}

create_node node1 "$NODE1_PORT"
"$CTL" wait-state node1 single 120 || exit 1
if [ "${APALIS_FORMATION_FAST:-1}" = 1 ]; then
  # A standby retries a lost walreceiver connection every wal_retrieve_retry_interval (5 s): after
  # the primary's postgres restarts, synchronous commits wait that long for it. node2 inherits
  # postgresql.auto.conf through pg_basebackup.
  # (The monitor knows node1 as single before its keeper has restarted postgres: retry.)
  topo_wait_sql 60 "$APALIS_FORMATION_NODE1_URL" "ALTER SYSTEM SET wal_retrieve_retry_interval = '500ms'" >/dev/null \
    && topo_wait_sql 10 "$APALIS_FORMATION_NODE1_URL" "SELECT pg_reload_conf()" >/dev/null || exit 1
fi
T_NODE1=$(topo_now_ms)
create_node node2 "$NODE2_PORT"
"$CTL" wait-stable 180 || exit 1
if [ "$NODES" = 3 ]; then
  create_node node3 "$NODE3_PORT"
  "$CTL" wait-state node3 secondary 180 && "$CTL" wait-stable 60 || exit 1
  # Every acknowledged commit on a standby, always (see the header).
  "$CTL" as-user pg_autoctl set formation number-sync-standbys 1 --monitor "$MONITOR_URL" \
    --formation default >>"$WORK/logs/settings.log" 2>&1 \
    || { topo_log "could not set number-sync-standbys 1"; cat "$WORK/logs/settings.log" >&2; exit 1; }
  # The monitor has it; the primary applies it (apply_settings) before the formation is stable.
  topo_wait_true 60 "$MONITOR_SU_URL" \
    "SELECT number_sync_standbys = 1 FROM pgautofailover.formation WHERE formationid = 'default'" \
    || exit 1
  "$CTL" wait-stable 60 || exit 1
fi
T_NODE2=$(topo_now_ms)

# --- URLs ------------------------------------------------------------------------------------
FORMATION_URI=$("$CTL" as-user pg_autoctl show uri --monitor "$MONITOR_URL" --formation default)
# Insert the user (pg_autoctl's URI has none; the nodes' superuser is the OS user's name).
APALIS_FORMATION_URL=$(printf '%s' "$FORMATION_URI" | sed "s#^postgres://#postgres://$TOPO_USER@#")
APALIS_FORMATION_MONITOR_URL=$MONITOR_SU_URL
APALIS_FORMATION_CTL=$CTL
export APALIS_FORMATION_URL APALIS_FORMATION_NODE1_URL APALIS_FORMATION_NODE2_URL APALIS_FORMATION_NODE3_URL \
  APALIS_FORMATION_MONITOR_URL APALIS_FORMATION_CTL APALIS_FORMATION_PG_AUTOCTL_URI="$FORMATION_URI"
echo "FORMATION_URL='$APALIS_FORMATION_URL'" >>"$WORK/formation.env"

# A table the probes write to, created through the multi-host URI (so on the primary).
psql "$APALIS_FORMATION_URL" -X -q -v ON_ERROR_STOP=1 \
  -c "CREATE TABLE IF NOT EXISTS apalis_formation_probe (id bigserial PRIMARY KEY, at timestamptz NOT NULL DEFAULT clock_timestamp(), note text)" \
  >/dev/null
"$CTL" wait-writable 30 >/dev/null || exit 1
T_READY=$(topo_now_ms)
failed=0
topo_log "formation up in $(( (T_READY - T0) / 1000 )).$(( (T_READY - T0) % 1000 / 100 ))s" \
  "(monitor $(( T_MONITOR - T0 )) ms, primary +$(( T_NODE1 - T_MONITOR )) ms," \
  "$(( NODES - 1 )) synchronous secondaries +$(( T_NODE2 - T_NODE1 )) ms): $APALIS_FORMATION_URL"
echo "FORMATION_UP_MS=$(( T_READY - T0 ))" >>"$WORK/formation.env"

set +e
"$@"
status=$?
set -e
exit "$status"
