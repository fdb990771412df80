# Shared helpers for the topology scripts (with-pgbouncer.sh, with-replica.sh, with-formation.sh).
# Sourced, not run. Every helper logs to stderr with the calling script's prefix ($TOPO_NAME).

topo_log() { echo "[${TOPO_NAME:-topo}] $*" >&2; }

topo_as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

# topo_apt_install PKG...: installs Debian packages without letting their maintainer scripts start
# a service (pgbouncer's and postgresql's packages would otherwise start one), refreshing the
# package lists only when the first attempt fails.
topo_apt_install() {
  local created_policy=0 status=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    topo_as_root sh -c 'printf "#!/bin/sh\nexit 101\n" > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d'
    created_policy=1
  fi
  topo_log "installing Debian packages: $*"
  topo_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >&2 \
    || { topo_as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2 \
         && topo_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "$@" >&2; } \
    || status=$?
  if [ "$created_policy" -eq 1 ]; then topo_as_root rm -f /usr/sbin/policy-rc.d; fi
  return "$status"
}

# The unprivileged OS user servers run as (PostgreSQL, PgBouncer and pg_autoctl refuse root):
# APALIS_PG_USER when with-pg.sh started the cluster, else `postgres` as root, else ourselves.
topo_pick_user() {
  if [ "$(id -u)" -eq 0 ]; then
    TOPO_USER=${APALIS_PG_USER:-postgres}
    if ! id "$TOPO_USER" >/dev/null 2>&1; then
      useradd --system --home-dir /var/lib/postgresql --shell /bin/sh "$TOPO_USER"
    fi
  else
    TOPO_USER=$(id -un)
  fi
}

# topo_run_as CMD...: runs CMD as $TOPO_USER.
topo_run_as() {
  if [ "$(id -u)" -eq 0 ] && [ "$TOPO_USER" != root ]; then
    runuser -u "$TOPO_USER" -- "$@"
  else
    "$@"
  fi
}

topo_port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# topo_free_port VAR BASE: sets VAR to the first port from BASE (up to BASE+500) that nothing
# listens on and that no earlier call in this shell handed out (not in a subshell: it remembers).
TOPO_TAKEN_PORTS=" "
topo_free_port() {
  local p
  for p in $(seq "$2" 1 "$(( $2 + 500 ))"); do
    case "$TOPO_TAKEN_PORTS" in *" $p "*) continue ;; esac
    if ! topo_port_in_use "$p"; then
      TOPO_TAKEN_PORTS="$TOPO_TAKEN_PORTS$p "
      printf -v "$1" '%s' "$p"
      return 0
    fi
  done
  topo_log "no free port from $2"
  return 1
}

# PostgreSQL's server binaries for a major version (or the newest one installed).
topo_find_pg_bindir() {
  local major=${1:-} d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -n "$major" ] && [ "$d" != "/usr/lib/postgresql/$major/bin" ]; then continue; fi
    if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/postgres" ]; then
      echo "$d"
      return 0
    fi
  done
  return 1
}

# topo_parse_url URL: sets URL_USER, URL_PASSWORD, URL_HOST, URL_PORT, URL_DB, URL_QUERY from a
# single-host postgres:// URL (the form with-pg.sh exports). Percent-escapes are not decoded.
topo_parse_url() {
  local re='^postgres(ql)?://(([^:@/]*)(:([^@/]*))?@)?([^:/?]*)(:([0-9]+))?(/([^?]*))?(\?(.*))?$'
  if [[ ! "$1" =~ $re ]]; then
    topo_log "cannot parse the URL $1 (want postgres://user[:password]@host[:port]/db[?...])"
    return 1
  fi
  URL_USER=${BASH_REMATCH[3]:-postgres}
  URL_PASSWORD=${BASH_REMATCH[5]:-}
  URL_HOST=${BASH_REMATCH[6]:-127.0.0.1}
  URL_PORT=${BASH_REMATCH[8]:-5432}
  URL_DB=${BASH_REMATCH[10]:-$URL_USER}
  URL_QUERY=${BASH_REMATCH[12]:-}
}

# topo_wait_sql TIMEOUT_S URL SQL: retries `psql URL -c SQL` until it succeeds (prints its output).
topo_wait_sql() {
  local deadline=$(( $(date +%s) + $1 )) out
  while :; do
    if out=$(psql "$2" -X -qAt -v ON_ERROR_STOP=1 -c "$3" 2>&1); then
      printf '%s\n' "$out"
      return 0
    fi
    if [ "$(date +%s)" -ge "$deadline" ]; then
      printf '%s\n' "$out" >&2
      return 1
    fi
    sleep 0.2
  done
}

# Milliseconds since the epoch, for the timings the scripts report.
topo_now_ms() { date +%s%3N; }

# topo_wait_true TIMEOUT_S URL SQL: retries until SQL (one boolean) answers t.
topo_wait_true() {
  local deadline=$(( $(date +%s) + $1 )) out=""
  while :; do
    out=$(psql "$2" -X -qAt -v ON_ERROR_STOP=1 -c "$3" 2>&1) && [ "$out" = t ] && return 0
    if [ "$(date +%s)" -ge "$deadline" ]; then
      topo_log "timed out waiting for: $3 (last answer: $out)"
      return 1
    fi
    sleep 0.2
  done
}

# topo_reaper CODE: runs the shell CODE once this script's process ($$) is gone, from a detached
# watcher in its own session. The EXIT trap is the normal cleanup; this one also covers a script
# killed by SIGKILL, or whose process group a CI runner or job control killed mid-cleanup
# (servers started with -d or setsid are outside that group and would otherwise live on). CODE
# must be harmless when the normal cleanup already ran.
topo_reaper() {
  setsid bash -c 'while kill -0 "$0" 2>/dev/null; do sleep 1; done; eval "$1"' "$$" "$1" \
    </dev/null >/dev/null 2>&1 &
}
