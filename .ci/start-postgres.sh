#!/usr/bin/env bash
# Start a throwaway PostgreSQL server on loopback for the tests and print its SQLAlchemy URL.
#
#   LMBATCH_TEST_PG_URL="$(.ci/start-postgres.sh)"
#
# Installs Debian's postgresql package when missing (needs root and apt), initialises a cluster
# in $LMBATCH_PG_DIR (default: a directory under /tmp), listens on 127.0.0.1:$LMBATCH_PG_PORT
# only, with trust auth (loopback, test data only), and creates the database. Idempotent: a
# second call finds the server running and prints the same URL. Progress goes to stderr; stdout
# is only the URL. When PostgreSQL cannot be installed here (no root, no apt) it prints nothing
# and exits 0, and the PostgreSQL tests skip; any other failure is an error.
set -euo pipefail

PG_DIR="${LMBATCH_PG_DIR:-/tmp/lmbatch-pg}"
PG_PORT="${LMBATCH_PG_PORT:-55432}"
PG_DB="${LMBATCH_PG_DB:-lmbatch_test}"
log() { echo "start-postgres: $*" >&2; }

pg_bindir() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

if [ -z "$(pg_bindir)" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    log "installing postgresql (apt)"
    apt-get update -qq >&2 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq postgresql >&2
  else
    log "PostgreSQL is not installed and cannot be installed here (needs root and apt); skipping"
    exit 0
  fi
fi
BIN="$(pg_bindir)"

# The server refuses to run as root: run it as the postgres user (created by the package).
if [ "$(id -u)" = 0 ]; then
  PG_USER=postgres
  as_pg() { runuser -u postgres -- "$@"; }
else
  PG_USER="$(id -un)"
  as_pg() { "$@"; }
fi

mkdir -p "$PG_DIR"
if [ "$(id -u)" = 0 ]; then chown postgres:postgres "$PG_DIR"; fi
if [ ! -f "$PG_DIR/data/PG_VERSION" ]; then
  log "initdb in $PG_DIR/data"
  as_pg "$BIN/initdb" -D "$PG_DIR/data" -U "$PG_USER" --auth=trust -E UTF8 >&2
fi
ready() { as_pg "$BIN/pg_isready" -q -h 127.0.0.1 -p "$PG_PORT"; }

# A live server of this data directory: a zombie has no command line, and another program that
# reuses the PID has another one.
is_our_server() { [ -n "$1" ] && tr '\0' ' ' <"/proc/$1/cmdline" 2>/dev/null | grep -qF -- "-D $PG_DIR/data"; }

# A server killed with -9 (as a session's processes are when it stops) leaves postmaster.pid and
# the socket's lock file behind. If their PID still looks alive (a zombie nobody reaped, or a
# reused PID), pg_ctl and the server itself take the dead server for a running one: pg_ctl
# reports it running and a start is refused. Trust only a server that answers; stop a postgres
# that holds the lock but does not answer, and remove locks whose owner is gone.
clear_stale_server() {
  local pid
  pid="$(head -n 1 "$PG_DIR/data/postmaster.pid" 2>/dev/null || true)"
  if is_our_server "$pid"; then
    log "server $pid holds the data directory but does not answer; stopping it"
    as_pg "$BIN/pg_ctl" -D "$PG_DIR/data" -m immediate -w -t 60 stop >&2 || true
  fi
  if [ -f "$PG_DIR/data/postmaster.pid" ] && ! is_our_server "$pid"; then
    log "removing the lock files of a server that is gone (PID $pid)"
    rm -f "$PG_DIR/data/postmaster.pid" "$PG_DIR/.s.PGSQL.$PG_PORT" "$PG_DIR/.s.PGSQL.$PG_PORT.lock"
  fi
}

if ! ready; then
  clear_stale_server
  log "starting on 127.0.0.1:$PG_PORT"
  as_pg "$BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_DIR" start >&2
  ready || { log "the server does not answer on 127.0.0.1:$PG_PORT; its log:"; tail -n 20 "$PG_DIR/server.log" >&2; exit 1; }
fi
if ! as_pg "$BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" -d postgres -tAc \
    "select 1 from pg_database where datname = '$PG_DB'" | grep -q 1; then
  as_pg "$BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" "$PG_DB" >&2
fi
echo "postgresql+psycopg://$PG_USER@127.0.0.1:$PG_PORT/$PG_DB"
