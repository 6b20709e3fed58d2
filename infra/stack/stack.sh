#!/usr/bin/env bash
# A real Prefect stack on loopback, laid out as docker-compose.yml lays it out, without Docker:
# PostgreSQL and Redis (and Chromium for the UI check) from Debian's packages, `prefect server start --no-services` plus
# `prefect server services start` against them (events and the Docket queue over Redis).
#
#   infra/stack/stack.sh up DIR     install what is missing, start everything, write DIR/env
#   infra/stack/stack.sh down DIR   stop everything started under DIR and remove DIR
#
# DIR/env holds the settings a client needs (PREFECT_API_URL and the auth string, the call cache's
# PostgreSQL URL, the heartbeat settings); `make test-stack` sources it. Run as root (it installs Debian packages and starts PostgreSQL as
# the `postgres` user: PostgreSQL refuses to run as root). Everything listens on 127.0.0.1 only,
# and the Prefect API asks for basic auth, as in docker-compose.yml.
set -euo pipefail

cmd=${1:?usage: stack.sh up|down DIR}
dir=${2:?usage: stack.sh up|down DIR}
root=$(cd "$(dirname "$0")/../.." && pwd)
python=${PYTHON:-$root/.venv/bin/python}
prefect=$(dirname "$python")/prefect

free_port() { "$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }

pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1; }

install_packages() {
    local missing=()
    [ -n "$(pg_bin)" ] || missing+=(postgresql)
    command -v redis-server >/dev/null || missing+=(redis-server)
    command -v chromium >/dev/null || missing+=(chromium)   # the UI check's headless browser
    [ ${#missing[@]} -eq 0 ] && return
    echo "stack: installing ${missing[*]} from Debian's packages"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y -q "${missing[@]}" >/dev/null || { apt-get update -q >/dev/null && apt-get install -y -q "${missing[@]}" >/dev/null; }
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
    local limit=$1 what=$2; shift 2
    for _ in $(seq "$limit"); do "$@" >/dev/null 2>&1 && return 0; sleep 1; done
    echo "stack: $what did not come up within $limit s" >&2
    return 1
}

up() {
    install_packages
    mkdir -p "$dir"
    chmod 755 "$dir"
    local pg_port redis_port api_port password auth bin
    pg_port=$(free_port); redis_port=$(free_port); api_port=$(free_port)
    password=$("$python" -c 'import secrets; print(secrets.token_hex(16))')
    auth="longreward:$("$python" -c 'import secrets; print(secrets.token_hex(16))')"
    bin=$(pg_bin)

    # PostgreSQL: a cluster of its own under DIR, owned by the postgres user.
    install -d -o postgres -g postgres "$dir/pg"
    printf '%s\n' "$password" > "$dir/pg.pass"; chown postgres "$dir/pg.pass"; chmod 600 "$dir/pg.pass"
    runuser -u postgres -- "$bin/initdb" -D "$dir/pg/data" -U postgres --pwfile="$dir/pg.pass" -A scram-sha-256 >/dev/null
    runuser -u postgres -- "$bin/pg_ctl" -D "$dir/pg/data" -l "$dir/pg/server.log" -w \
        -o "-c listen_addresses=127.0.0.1 -c port=$pg_port -c unix_socket_directories=$dir/pg -c max_connections=200" start >/dev/null
    export PGPASSWORD=$password
    for db in prefect longreward; do
        psql -h 127.0.0.1 -p "$pg_port" -U postgres -q -c "CREATE DATABASE $db" >/dev/null
    done

    # Redis: Prefect's messaging broker and cache, and the Docket work queue.
    redis-server --bind 127.0.0.1 --port "$redis_port" --dir "$dir" --save '' --appendonly no \
        --daemonize yes --pidfile "$dir/redis.pid" --logfile "$dir/redis.log"
    wait_for 30 redis redis-cli -p "$redis_port" ping

    # The settings of docker-compose.yml's x-prefect-server-env, pointed at loopback.
    (umask 077; cat > "$dir/server.env") <<EOF
export PREFECT_HOME=$dir/prefect-home
export PREFECT_SERVER_API_AUTH_STRING=$auth
export PREFECT_API_DATABASE_CONNECTION_URL=postgresql+asyncpg://postgres:$password@127.0.0.1:$pg_port/prefect
export PREFECT_MESSAGING_BROKER=prefect_redis.messaging
export PREFECT_MESSAGING_CACHE=prefect_redis.messaging
export PREFECT_SERVER_EVENTS_CAUSAL_ORDERING=prefect_redis.ordering
export PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=prefect_redis.lease_storage
export PREFECT_REDIS_MESSAGING_HOST=127.0.0.1
export PREFECT_REDIS_MESSAGING_PORT=$redis_port
export PREFECT_REDIS_MESSAGING_DB=0
export PREFECT_SERVER_DOCKET_URL=redis://127.0.0.1:$redis_port/1
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export PREFECT_UI_API_URL=http://127.0.0.1:$api_port/api
# A test stack: the scheduler looks every few seconds instead of every minute.
export PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS=2
export PREFECT_SERVER_SERVICES_SCHEDULER_RECENT_DEPLOYMENTS_LOOP_SECONDS=2
EOF
    (
        # shellcheck disable=SC1091
        source "$dir/server.env"
        unset PREFECT_API_URL
        # The API server runs the migrations; the services start once it answers.
        PREFECT_API_DATABASE_MIGRATE_ON_START=true setsid "$prefect" server start --host 127.0.0.1 --port "$api_port" --no-services \
            > "$dir/server.log" 2>&1 < /dev/null &
        echo $! > "$dir/server.pid"
        wait_for 180 "the Prefect API server" "$python" -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:$api_port/api/health', timeout=5)"
        PREFECT_API_DATABASE_MIGRATE_ON_START=false setsid "$prefect" server services start \
            > "$dir/services.log" 2>&1 < /dev/null &
        echo $! > "$dir/services.pid"
    )

    (umask 077; cat > "$dir/env") <<EOF
export PREFECT_API_URL=http://127.0.0.1:$api_port/api
export PREFECT_API_AUTH_STRING=$auth
# Flow runs report a heartbeat every 30 s (Prefect's minimum); deploy.sh's automation marks a run
# Crashed 90 s after its last one (docker-compose.yml and deploy.sh: 60 s and 300 s).
export PREFECT_FLOWS_HEARTBEAT_FREQUENCY=30
export LONGREWARD_ZOMBIE_AFTER_S=90
export PREFECT_SERVER_ANALYTICS_ENABLED=false
export LONGREWARD_STACK_DIR=$dir
export LONGREWARD_TEST_PG_URL=postgresql://postgres@127.0.0.1:$pg_port/longreward
export PGPASSWORD=$password
EOF
    echo "stack: up (API http://127.0.0.1:$api_port/api, PostgreSQL :$pg_port, Redis :$redis_port) under $dir"
}

stop_group() {  # stop_group PIDFILE: the process and everything it started
    [ -f "$1" ] || return 0
    local pid; pid=$(cat "$1")
    kill -TERM -- "-$pid" 2>/dev/null || true
    for _ in $(seq 20); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.5; done
    kill -KILL -- "-$pid" 2>/dev/null || true
}

down() {
    [ -d "$dir" ] || return 0
    for name in worker services server; do
        for pidfile in "$dir"/$name*.pid; do stop_group "$pidfile"; done
    done
    if [ -f "$dir/redis.pid" ]; then kill "$(cat "$dir/redis.pid")" 2>/dev/null || true; fi
    if [ -f "$dir/pg/data/postmaster.pid" ]; then
        runuser -u postgres -- "$(pg_bin)/pg_ctl" -D "$dir/pg/data" -m fast -w stop >/dev/null || true
    fi
    rm -rf "$dir"
    echo "stack: down, $dir removed"
}

case $cmd in
    up) up ;;
    down) down ;;
    *) echo "usage: stack.sh up|down DIR" >&2; exit 2 ;;
esac
