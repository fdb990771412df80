#!/usr/bin/env bash
# Runs a command with DATABASE_URL pointing at a working PostgreSQL.
#
#   scripts/with-pg.sh cargo test
#
# - DATABASE_URL already set: it is used as is and nothing is started.
# - Otherwise a throwaway PostgreSQL cluster is created in a temporary directory, owned by a
#   non-root user (the `postgres` system user when this runs as root, since PostgreSQL refuses
#   to run as root), started on a free port on 127.0.0.1, and stopped and deleted when the
#   command ends. If the server binaries are missing, Debian's `postgresql` package is installed
#   first (as root, or through sudo).
#
# The command also sees APALIS_PG_BINDIR, APALIS_PG_DATADIR, APALIS_PG_USER and APALIS_PG_PORT,
# so fault tests can restart the server.
#
# Environment:
#   APALIS_PG_DURABLE=1   keep PostgreSQL's durable defaults (fsync, synchronous_commit on);
#                         by default the throwaway cluster trades durability for speed.
#   APALIS_PG_OPTS="..."  extra `postgres` options, e.g. "-c max_connections=500".
set -euo pipefail

if [ "$#" -eq 0 ]; then
  echo "usage: $0 <command> [args...]" >&2
  exit 2
fi
if [ -n "${DATABASE_URL:-}" ]; then
  exec "$@"
fi

log() { echo "[with-pg] $*" >&2; }

as_root() {
  if [ "$(id -u)" -eq 0 ]; then "$@"; else sudo "$@"; fi
}

find_bindir() {
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ] && [ -x "$d/postgres" ]; then
      echo "$d"
      return 0
    fi
  done
  if command -v pg_ctl >/dev/null 2>&1 && command -v initdb >/dev/null 2>&1; then
    dirname "$(readlink -f "$(command -v pg_ctl)")"
    return 0
  fi
  return 1
}

BINDIR=$(find_bindir || true)
if [ -z "$BINDIR" ]; then
  log "PostgreSQL server binaries not found; installing Debian's postgresql package"
  created_policy=0
  if [ ! -e /usr/sbin/policy-rc.d ]; then
    # Keep the package from starting its own cluster as a service.
    as_root sh -c 'printf "#!/bin/sh\nexit 101\n" > /usr/sbin/policy-rc.d && chmod 755 /usr/sbin/policy-rc.d'
    created_policy=1
  fi
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    postgresql postgresql-contrib >&2
  if [ "$created_policy" -eq 1 ]; then as_root rm -f /usr/sbin/policy-rc.d; fi
  BINDIR=$(find_bindir) || { log "no PostgreSQL server binaries after installing"; exit 1; }
fi

# pg_partman, for the tests of PGMQ's partitioned queues (they skip, saying so, without it).
MAJOR=$("$BINDIR/postgres" --version | grep -oE '[0-9]+' | head -1)
if [ ! -e "/usr/share/postgresql/$MAJOR/extension/pg_partman.control" ] && [ "$(id -u)" -eq 0 ]; then
  log "installing Debian's postgresql-$MAJOR-partman (pg_partman)"
  { DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "postgresql-$MAJOR-partman" >&2 \
    || { apt-get update -q >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "postgresql-$MAJOR-partman" >&2; }; } \
    || log "could not install pg_partman; the partitioned-queue tests will be skipped"
fi

# PostgreSQL refuses to run as root: pick an unprivileged owner.
if [ "$(id -u)" -eq 0 ]; then
  PGUSER_OS=postgres
  if ! id "$PGUSER_OS" >/dev/null 2>&1; then
    useradd --system --home-dir /var/lib/postgresql --shell /bin/sh "$PGUSER_OS"
  fi
  run_pg() { runuser -u "$PGUSER_OS" -- "$@"; }
else
  PGUSER_OS=$(id -un)
  run_pg() { "$@"; }
fi

port_in_use() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
PORT=""
for p in $(seq "${APALIS_PG_PORT_BASE:-55432}" 1 "$(( ${APALIS_PG_PORT_BASE:-55432} + 200 ))"); do
  if ! port_in_use "$p"; then PORT=$p; break; fi
done
[ -n "$PORT" ] || { log "no free port found"; exit 1; }

WORK=$(mktemp -d /tmp/apalis-pg.XXXXXX)
chmod 755 "$WORK"
DATA="$WORK/data"
mkdir -p "$DATA"
chown -R "$PGUSER_OS" "$WORK"
chmod 700 "$DATA"

cleanup() {
  local status=$?
  run_pg "$BINDIR/pg_ctl" -D "$DATA" -m immediate -w stop >/dev/null 2>&1 || true
  rm -rf "$WORK"
  exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

log "initialising a throwaway cluster in $DATA ($("$BINDIR/postgres" --version))"
run_pg "$BINDIR/initdb" -D "$DATA" -U postgres --auth=trust -E UTF8 --locale=C --no-sync >"$WORK/initdb.log" 2>&1 \
  || { cat "$WORK/initdb.log" >&2; exit 1; }

OPTS="-p $PORT -k $WORK -c listen_addresses=127.0.0.1 -c max_connections=400 -c shared_buffers=256MB"
# TLS for the tests that ask for it (sslmode=require / verify-full): a throwaway CA and a
# certificate for localhost and 127.0.0.1. DATABASE_URL itself says sslmode=disable, so the other tests
# (and the fault suite's proxy, which reads the protocol) run in the clear.
SSL_CERT=""
if ! command -v openssl >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ]; then
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends openssl >&2 || true
fi
if command -v openssl >/dev/null 2>&1; then
  # A throwaway CA and a server certificate it signed (verify-full wants a real chain).
  printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\nbasicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\nextendedKeyUsage=serverAuth\n' >"$WORK/server.ext"
  if openssl req -x509 -newkey rsa:2048 -nodes -days 2 -subj "/CN=apalis-pgmq-notify test CA" \
       -addext "basicConstraints=critical,CA:TRUE" -addext "keyUsage=critical,keyCertSign" \
       -keyout "$WORK/ca.key" -out "$WORK/ca.crt" >"$WORK/openssl.log" 2>&1 \
     && openssl req -newkey rsa:2048 -nodes -subj "/CN=localhost" \
       -keyout "$WORK/server.key" -out "$WORK/server.csr" >>"$WORK/openssl.log" 2>&1 \
     && openssl x509 -req -in "$WORK/server.csr" -CA "$WORK/ca.crt" -CAkey "$WORK/ca.key" \
       -CAcreateserial -days 2 -extfile "$WORK/server.ext" -out "$WORK/server.crt" \
       >>"$WORK/openssl.log" 2>&1; then
    chown "$PGUSER_OS" "$WORK/server.key" "$WORK/server.crt"
    chmod 600 "$WORK/server.key"
    chmod 644 "$WORK/server.crt" "$WORK/ca.crt"
    OPTS="$OPTS -c ssl=on -c ssl_cert_file=$WORK/server.crt -c ssl_key_file=$WORK/server.key"
    SSL_CERT="$WORK/ca.crt"
  fi
fi
if [ "${APALIS_PG_DURABLE:-0}" != "1" ]; then
  OPTS="$OPTS -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
fi
OPTS="$OPTS ${APALIS_PG_OPTS:-}"
run_pg "$BINDIR/pg_ctl" -D "$DATA" -l "$WORK/postgres.log" -w -t 60 -o "$OPTS" start >/dev/null \
  || { cat "$WORK/postgres.log" >&2; exit 1; }
log "PostgreSQL is up on 127.0.0.1:$PORT"

export DATABASE_URL="postgres://postgres@127.0.0.1:$PORT/postgres?sslmode=disable"
if [ -n "$SSL_CERT" ]; then export APALIS_PG_SSL_CERT="$SSL_CERT"; fi
export APALIS_PG_BINDIR="$BINDIR" APALIS_PG_DATADIR="$DATA" APALIS_PG_USER="$PGUSER_OS" \
  APALIS_PG_PORT="$PORT" APALIS_PG_OPTS_EFFECTIVE="$OPTS" APALIS_PG_LOG="$WORK/postgres.log"

set +e
"$@"
status=$?
set -e
exit "$status"
