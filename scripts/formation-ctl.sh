#!/usr/bin/env bash
# Drives the pg_auto_failover formation that scripts/with-formation.sh started (it finds it
# through APALIS_FORMATION_DIR). Tests call it as "$APALIS_FORMATION_CTL" <command>.
#
#   primary                    prints the name (node1/node2/node3) of the node that is primary now
#   state                      `pg_autoctl show state`
#   failover [--no-wait]       `pg_autoctl perform failover`, then waits until the formation URL
#                              takes writes again; prints the milliseconds that took (--no-wait:
#                              returns once the monitor has accepted the failover)
#   switchover [--no-wait]     the same with `pg_autoctl perform switchover`
#   kill-postgres [NODE]       SIGKILL the postmaster of NODE (default: the primary). Its keeper
#                              restarts it (crash recovery, same primary): no failover.
#   kill-node [NODE]           SIGKILL NODE's keeper and postmaster (default: the primary), as a
#                              machine dying would: the monitor promotes a standby
#   stop-node NODE             stops NODE's keeper and postgres cleanly (pg_autoctl stop)
#   start-node NODE            starts NODE's keeper again (`pg_autoctl run`); a former primary
#                              rejoins as a secondary (pg_rewind)
#   wait-writable [SECONDS]    waits until an INSERT through the formation URL commits; prints ms
#   wait-stable [SECONDS]      waits until one node is primary and every other one secondary
#   wait-state NODE STATE [S]  waits until NODE's reported and assigned states are STATE
#   probe | probe-kv           one INSERT through the formation URL, or through the keyword/value
#                              form of the same multi-host string (exit status: did it commit)
#   node-url NODE | pid NODE | postmaster-pid NODE | events
#   selftest                   measures failover, switchover, kill-node and kill-postgres
#   as-user CMD... | spawn NAME ARGS... | stop-all   (used by with-formation.sh)
set -euo pipefail
: "${APALIS_FORMATION_DIR:?APALIS_FORMATION_DIR is not set; run this under scripts/with-formation.sh}"
# shellcheck disable=SC1091
. "$APALIS_FORMATION_DIR/formation.env"
HERE=$(cd "$(dirname "$0")" && pwd)
TOPO_NAME=formation-ctl
# shellcheck source=lib/topo-common.sh
. "$HERE/lib/topo-common.sh"
TOPO_USER=$FORMATION_USER
D=$FORMATION_DIR

# as_user CMD...: CMD as the formation's user, with pg_autoctl's XDG directories.
as_user() {
  if [ "$(id -u)" -eq 0 ] && [ "$FORMATION_USER" != root ]; then
    runuser -u "$FORMATION_USER" -- env XDG_CONFIG_HOME="$XDG_CONFIG_HOME" XDG_DATA_HOME="$XDG_DATA_HOME" \
      XDG_RUNTIME_DIR="$XDG_RUNTIME_DIR" PG_CONFIG="$PG_CONFIG" PATH="$PATH" PGHOST="$PGHOST" PG_REGRESS_SOCK_DIR="$PG_REGRESS_SOCK_DIR" "$@"
  else
    "$@"
  fi
}

# The pid of NAME's supervisor (`pg_autoctl create ... --run` or `pg_autoctl run`), if running.
supervisor_pid() {
  local f="$XDG_RUNTIME_DIR/pg_autoctl${D}/$1/pg_autoctl.pid" pid
  [ -f "$f" ] || return 1
  pid=$(head -1 "$f")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}
postmaster_pid() {
  local f="$D/$1/postmaster.pid" pid
  [ -f "$f" ] || return 1
  pid=$(head -1 "$f")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  echo "$pid"
}

monitor_sql() { psql "$FORMATION_MONITOR_SU_URL" -X -qAt -F ' ' -v ON_ERROR_STOP=1 -c "$1"; }

# "name reported goal" for each node of the default formation.
node_states() {
  monitor_sql "SELECT nodename, reportedstate, goalstate FROM pgautofailover.node
               WHERE formationid = 'default' ORDER BY nodeid"
}

primary() {
  node_states | awk '($2 == "primary" || $2 == "wait_primary" || $2 == "single") && $2 == $3 { print $1; exit }'
}

node_port() {
  case "$1" in
    node1) echo "$FORMATION_NODE1_PORT" ;;
    node2) echo "$FORMATION_NODE2_PORT" ;;
    node3) [ -n "${FORMATION_NODE3_PORT:-}" ] || { topo_log "this formation has no node3"; return 1; }
           echo "$FORMATION_NODE3_PORT" ;;
    monitor) echo "$FORMATION_MONITOR_PORT" ;;
    *) topo_log "unknown node '$1'"; return 1 ;;
  esac
}

probe() {
  local out
  # A commit that waits for a synchronous standby that is gone would hang: statement_timeout
  # cancels that wait after 1 s, and a commit whose wait was cancelled ("canceling wait for
  # synchronous replication": committed locally, not acknowledged) does not count.
  if out=$(timeout 5 psql "$FORMATION_URL&connect_timeout=2" -X -qAt -v ON_ERROR_STOP=1 \
             -c "SET statement_timeout = '1s'" \
             -c "INSERT INTO apalis_formation_probe (note) VALUES ('probe') RETURNING id, inet_server_port()" 2>&1) \
     && ! grep -q "synchronous replication" <<<"$out"; then
    # Acknowledged: the selftest checks that every acknowledged row survives the failovers.
    echo "${out%%|*}" >>"$D/acked.ids"
    echo "${out##*|}"
    return 0
  fi
  echo "$out" >&2
  return 1
}

# The same write through libpq's keyword/value form of the multi-host string.
probe_kv() {
  local hosts=127.0.0.1,127.0.0.1 ports=$FORMATION_NODE1_PORT,$FORMATION_NODE2_PORT
  if [ -n "${FORMATION_NODE3_PORT:-}" ]; then hosts=$hosts,127.0.0.1 ports=$ports,$FORMATION_NODE3_PORT; fi
  timeout 5 psql "host=$hosts port=$ports user=$FORMATION_USER dbname=postgres target_session_attrs=read-write sslmode=disable connect_timeout=2" \
    -X -qAt -v ON_ERROR_STOP=1 -c "SET statement_timeout = '1s'" \
    -c "INSERT INTO apalis_formation_probe (note) VALUES ('probe-kv') RETURNING id, inet_server_port()" \
    >"$D/probe-kv.out" || return 1
  cut -d'|' -f1 "$D/probe-kv.out" >>"$D/acked.ids"
  cut -d'|' -f2 "$D/probe-kv.out"
}

wait_writable() {
  local timeout_s=${1:-60} start deadline
  start=$(topo_now_ms)
  deadline=$(( start + timeout_s * 1000 ))
  while ! probe >/dev/null 2>&1; do
    if [ "$(topo_now_ms)" -ge "$deadline" ]; then
      topo_log "the formation took no write within ${timeout_s}s"
      probe || true
      return 1
    fi
    sleep 0.1
  done
  echo $(( $(topo_now_ms) - start ))
}

wait_until() { # wait_until TIMEOUT_S DESCRIPTION TEST-COMMAND...
  local timeout_s=$1 what=$2 deadline
  shift 2
  deadline=$(( $(date +%s) + timeout_s ))
  until "$@" >/dev/null 2>&1; do
    if [ "$(date +%s)" -ge "$deadline" ]; then
      topo_log "timed out after ${timeout_s}s waiting for $what; states:"
      node_states >&2 || true
      return 1
    fi
    sleep 0.2
  done
}

is_state() { node_states | awk -v n="$1" -v s="$2" '$1 == n && $2 == s && $3 == s { f = 1 } END { exit !f }'; }
is_stable() {
  node_states | awk '$2 == $3 && $2 == "primary" { p++ } $2 == $3 && $2 == "secondary" { s++ }
                     END { exit !(p == 1 && s >= 1 && p + s == NR) }'
}

spawn() { # spawn NAME pg_autoctl-args...
  local name=$1
  shift
  if [ "$(id -u)" -eq 0 ] && [ "$FORMATION_USER" != root ]; then
    as_user setsid pg_autoctl "$@" >>"$D/logs/$name.log" 2>&1 </dev/null &
  else
    setsid pg_autoctl "$@" >>"$D/logs/$name.log" 2>&1 </dev/null &
  fi
  local launcher=$! i
  # Wait for its pid file (written once `create` has run initdb: slow on a loaded machine), so
  # that stop-all can always find it; give up at once if it exited.
  for i in $(seq 1 600); do
    supervisor_pid "$name" >/dev/null && return 0
    kill -0 "$launcher" 2>/dev/null || break
    sleep 0.1
  done
  topo_log "pg_autoctl for $name wrote no pid file; its log:"
  tail -n 30 "$D/logs/$name.log" >&2
  return 1
}

kill_node() {
  local name=$1 pid pm
  pid=$(supervisor_pid "$name" || true)
  pm=$(postmaster_pid "$name" || true)
  # The supervisor leads its own session (setsid): its process group holds the keeper's services
  # and the postmaster; the postmaster's children notice its death and exit.
  if [ -n "$pid" ]; then kill -KILL -- "-$pid" 2>/dev/null || kill -KILL "$pid" 2>/dev/null || true; fi
  if [ -n "$pm" ]; then kill -KILL "$pm" 2>/dev/null || true; fi
}

stop_gracefully() {
  local name=$1 pid i
  pid=$(supervisor_pid "$name" || true)
  if [ -n "$pid" ]; then
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
  fi
  kill_node "$name"
}

ms_since() { echo $(( $(topo_now_ms) - $1 )); }

cmd=${1:-}
[ -n "$cmd" ] || { sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 2; }
shift
case "$cmd" in
  as-user) as_user "$@" ;;
  spawn) spawn "$@" ;;
  start-node)
    [ -n "${1:-}" ] || { topo_log "start-node NODE"; exit 2; }
    if supervisor_pid "$1" >/dev/null; then topo_log "$1 is already running"; exit 0; fi
    spawn "$1" run --pgdata "$D/$1"
    ;;
  stop-node)
    [ -n "${1:-}" ] || { topo_log "stop-node NODE"; exit 2; }
    stop_gracefully "$1"
    ;;
  stop-all)
    for n in node3 node2 node1 monitor; do stop_gracefully "$n" || true; done
    ;;
  kill-node)
    name=${1:-$(primary)}
    [ -n "$name" ] || { topo_log "no primary to kill"; exit 1; }
    kill_node "$name"
    echo "$name"
    ;;
  kill-postgres)
    name=${1:-$(primary)}
    pm=$(postmaster_pid "$name") || { topo_log "$name has no running postmaster"; exit 1; }
    kill -KILL "$pm"
    echo "$name"
    ;;
  primary) primary ;;
  state) as_user pg_autoctl show state --monitor "$FORMATION_MONITOR_URL" --formation default ;;
  events) as_user pg_autoctl show events --monitor "$FORMATION_MONITOR_URL" --formation default --count "${1:-20}" ;;
  node-url) port=$(node_port "$1") || exit 1; echo "postgres://$FORMATION_USER@127.0.0.1:$port/postgres?sslmode=disable" ;;
  pid) supervisor_pid "$1" ;;
  postmaster-pid) postmaster_pid "$1" ;;
  probe) probe ;;
  probe-kv) probe_kv ;;
  wait-writable) wait_writable "${1:-60}" ;;
  wait-stable) wait_until "${1:-120}" "a primary and every other node secondary" is_stable ;;
  wait-state) wait_until "${3:-120}" "$1 in state $2" is_state "$1" "$2" ;;
  failover|switchover)
    wait=1 pg_wait=60
    [ "${1:-}" = --no-wait ] && wait=0 pg_wait=0
    t=$(topo_now_ms)
    as_user pg_autoctl perform "$cmd" --monitor "$FORMATION_MONITOR_URL" --formation default \
      --group 0 --wait "$pg_wait" >>"$D/logs/perform.log" 2>&1 \
      || { topo_log "pg_autoctl perform $cmd failed:"; tail -n 20 "$D/logs/perform.log" >&2; exit 1; }
    if [ "$wait" = 1 ]; then wait_writable 60 >/dev/null; fi
    ms_since "$t"
    ;;
  selftest)
    # Each step: the time from the action to the first INSERT that commits through the
    # multi-host URL (target_session_attrs=read-write), then to a settled primary+secondary.
    report() { printf '%-34s %6s ms  (writes on port %s)\n' "$1" "$2" "$3"; }
    # Both forms of the multi-host string must reach the same primary.
    same() {
      local a b
      a=$(probe) && b=$(probe_kv) && [ "$a" = "$b" ] \
        || { topo_log "URL form wrote on '${a:-}', keyword form on '${b:-}'"; exit 1; }
      echo "$a"
    }
    p=$(same) || { topo_log "no write before the selftest"; exit 1; }
    report "write before any failover" 0 "$p"

    t=$(topo_now_ms); old=$(primary)
    as_user pg_autoctl perform failover --monitor "$FORMATION_MONITOR_URL" --formation default \
      --group 0 --wait 0 >>"$D/logs/perform.log" 2>&1
    wait_writable 60 >/dev/null; w=$(ms_since "$t"); p=$(same)
    report "perform failover ($old)" "$w" "$p"
    wait_until 120 "settled" is_stable; report "  ...settled" "$(ms_since "$t")" "-"

    t=$(topo_now_ms); old=$(primary)
    as_user pg_autoctl perform switchover --monitor "$FORMATION_MONITOR_URL" --formation default \
      --group 0 --wait 0 >>"$D/logs/perform.log" 2>&1
    wait_writable 60 >/dev/null; w=$(ms_since "$t"); p=$(same)
    report "perform switchover ($old)" "$w" "$p"
    wait_until 120 "settled" is_stable; report "  ...settled" "$(ms_since "$t")" "-"

    t=$(topo_now_ms); old=$(primary)
    pm=$(postmaster_pid "$old"); kill -KILL "$pm"
    wait_writable 120 >/dev/null; w=$(ms_since "$t"); p=$(same)
    report "SIGKILL postmaster ($old)" "$w" "$p"
    wait_until 120 "settled" is_stable; report "  ...settled" "$(ms_since "$t")" "-"

    t=$(topo_now_ms); old=$(primary)
    kill_node "$old"
    wait_writable 120 >/dev/null; w=$(ms_since "$t"); p=$(same)
    report "SIGKILL node: keeper+pg ($old)" "$w" "$p"
    spawn "$old" run --pgdata "$D/$old"
    wait_until 180 "settled" is_stable; report "  ...$old back as secondary" "$(ms_since "$t")" "-"

    acked=$(sort -un "$D/acked.ids" | paste -sd, -)
    n_acked=$(sort -un "$D/acked.ids" | wc -l)
    n_found=$(psql "$FORMATION_URL" -X -qAt -c "SELECT count(*) FROM apalis_formation_probe WHERE id IN ($acked)")
    echo "acknowledged writes: $n_acked, found on the primary after all of it: $n_found"
    [ "$n_found" = "$n_acked" ] || { topo_log "acknowledged writes were lost"; exit 1; }
    ;;
  *) topo_log "unknown command '$cmd'"; exit 2 ;;
esac
