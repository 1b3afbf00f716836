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
if ! as_pg "$BIN/pg_ctl" -D "$PG_DIR/data" status >/dev/null 2>&1; then
  log "starting on 127.0.0.1:$PG_PORT"
  as_pg "$BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/server.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_DIR" start >&2
fi
if ! as_pg "$BIN/psql" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" -d postgres -tAc \
    "select 1 from pg_database where datname = '$PG_DB'" | grep -q 1; then
  as_pg "$BIN/createdb" -h 127.0.0.1 -p "$PG_PORT" -U "$PG_USER" "$PG_DB" >&2
fi
echo "postgresql+psycopg://$PG_USER@127.0.0.1:$PG_PORT/$PG_DB"
