#!/usr/bin/env bash
# A throwaway PostgreSQL 15 cluster run as the postgres user, with pg_linkhooks
# preloaded. Usage: cluster.sh start|stop|status DIR PORT [extra postgresql.conf lines]
set -euo pipefail
cmd=$1 dir=$2 port=$3
BIN=/usr/lib/postgresql/15/bin
as_pg() { runuser -u postgres -- "$@"; }
case "$cmd" in
  start)
    if [[ ! -f "$dir/PG_VERSION" ]]; then
      mkdir -p "$dir" && chown postgres:postgres "$dir" && chmod 700 "$dir"
      as_pg "$BIN/initdb" -D "$dir" -A trust -U postgres >/dev/null
      cat >> "$dir/postgresql.conf" <<CONF
listen_addresses = '127.0.0.1'
port = $port
unix_socket_directories = '$dir'
shared_preload_libraries = 'pg_linkhooks'
max_connections = 100
${4:-}
CONF
    fi
    as_pg "$BIN/pg_ctl" -D "$dir" -l "$dir/server.log" -w start >/dev/null
    ;;
  stop) as_pg "$BIN/pg_ctl" -D "$dir" -m fast -w stop >/dev/null ;;
  status) as_pg "$BIN/pg_ctl" -D "$dir" status ;;
esac
