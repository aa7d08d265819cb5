#!/usr/bin/env bash
# Make sure RabbitMQ and PostgreSQL answer on their local ports, starting the local ones if they do not.
# An explicit AMQP_URL / DATABASE_URL pointing elsewhere is left alone (only probed).
set -euo pipefail

answers() { (exec 3<>"/dev/tcp/$1/$2") 2>/dev/null; }

wait_for() {  # name host port seconds
  local deadline=$((SECONDS + $4))
  until answers "$2" "$3"; do
    if (( SECONDS >= deadline )); then echo "ensure-services: $1 did not answer on $2:$3 within $4 s" >&2; return 1; fi
    sleep 0.5
  done
  echo "ensure-services: $1 answers on $2:$3"
}

host_port() {  # url default_port -> "host port"
  python3 - "$1" "$2" <<'PY'
import sys
from urllib.parse import urlsplit
u = urlsplit(sys.argv[1])
print(u.hostname or "127.0.0.1", u.port or int(sys.argv[2]))
PY
}

read -r pg_host pg_port < <(host_port "${DATABASE_URL:-postgresql://postgres@127.0.0.1:5432/esim}" 5432)
read -r mq_host mq_port < <(host_port "${AMQP_URL:-amqp://guest:guest@127.0.0.1:5672/}" 5672)

if ! answers "$pg_host" "$pg_port"; then
  if [[ "$pg_host" == 127.0.0.1 || "$pg_host" == localhost ]] && command -v pg_ctlcluster >/dev/null; then
    echo "ensure-services: starting the local PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | sort -V | tail -n1)" main start || true
  fi
fi

if ! answers "$mq_host" "$mq_port"; then
  if [[ "$mq_host" == 127.0.0.1 || "$mq_host" == localhost ]] && command -v rabbitmq-server >/dev/null; then
    echo "ensure-services: starting the local RabbitMQ"
    # With the default 1024 open files, RabbitMQ 3.10's file-handle budget (~930) runs out once a few
    # hundred quorum queues exist, and from then on it accepts TCP connections but never answers the
    # AMQP handshake. Start it with the hard limit instead (the Debian wrapper's `su` would reset it).
    if id rabbitmq >/dev/null 2>&1 && [[ -x /usr/lib/rabbitmq/bin/rabbitmq-server ]]; then
      su rabbitmq -s /bin/sh -c 'ulimit -n "$(ulimit -Hn)"; /usr/lib/rabbitmq/bin/rabbitmq-server -detached' || true
    else
      (ulimit -n "$(ulimit -Hn)"; rabbitmq-server -detached) || true
    fi
  fi
fi

wait_for PostgreSQL "$pg_host" "$pg_port" 60
wait_for RabbitMQ "$mq_host" "$mq_port" 90

# The management UI and the Prometheus endpoint are what operators look at; enable them when we can.
if [[ "${ENSURE_RABBITMQ_PLUGINS:-1}" == 1 ]] && command -v rabbitmq-plugins >/dev/null \
   && [[ "$mq_host" == 127.0.0.1 || "$mq_host" == localhost ]]; then
  rabbitmq-plugins enable --quiet rabbitmq_management rabbitmq_prometheus >/dev/null 2>&1 \
    || echo "ensure-services: could not enable the RabbitMQ management/prometheus plugins (not fatal)" >&2
fi
