#!/usr/bin/env bash
# A local three-node Cassandra cluster on 127.0.0.1, 127.0.0.2 and 127.0.0.3, each
# node started and stopped by scripts/cassandra.sh (one way of running a node).
#
#   scripts/cassandra-cluster.sh up               start every node (idempotent), wait until each sees the others
#   scripts/cassandra-cluster.sh down [--wipe]    stop every node; --wipe deletes their data and logs
#   scripts/cassandra-cluster.sh kill N           SIGKILL node N (1-3): a machine that dies
#   scripts/cassandra-cluster.sh start N          start node N again, wait until CQL answers
#   scripts/cassandra-cluster.sh status           exit 0 when every node answers CQL
#   scripts/cassandra-cluster.sh pid N            the pid of node N (exit 1 when it is not running)
#   scripts/cassandra-cluster.sh nodetool N ARGS  nodetool against node N (status, repair, tpstats…)
#
# Its ports stay clear of a single node on 127.0.0.1:9042/7000, so both can run
# at once. Contact points for the service:
#   cassandra://127.0.0.1,127.0.0.2,127.0.0.3:9142/flameup_events?protocol_version=3&local_dc=datacenter1&replication=datacenter1:3
# (SimpleSnitch puts every node in datacenter1.)
#
# Env knobs (the defaults are what the tests and `make run-cluster` use):
#   CASS_CLUSTER_DIR           everything, one subdirectory per node (default <repo>/.cassandra-cluster, git-ignored)
#   CASS_CLUSTER_NODES         how many nodes (default 3; node N listens on 127.0.0.N)
#   CASS_CLUSTER_PORT          CQL port of every node (default 9142)
#   CASS_CLUSTER_STORAGE_PORT  inter-node port of every node (default 7100)
#   CASS_CLUSTER_JMX_PORT      JMX port of node N is this + 100 N (default 7199: 7299, 7399, 7499)
#   CASS_CLUSTER_HEAP          heap per node (default 512m: about 1.3 GiB for three)
#   CASS_CLUSTER_PHI           phi_convict_threshold (default 5: a dead node is marked DOWN in
#                              about 12 s on loopback, 19 s at Cassandra's default 8)
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="${CASS_CLUSTER_DIR:-$ROOT/.cassandra-cluster}"
NODES="${CASS_CLUSTER_NODES:-3}"
PORT="${CASS_CLUSTER_PORT:-9142}"
STORAGE_PORT="${CASS_CLUSTER_STORAGE_PORT:-7100}"
JMX_BASE="${CASS_CLUSTER_JMX_PORT:-7199}"
HEAP="${CASS_CLUSTER_HEAP:-512m}"
PHI="${CASS_CLUSTER_PHI:-5}"
WAIT="${CASS_WAIT:-120}"

usage() { sed -n '5,11p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

node_ok() { [[ "$1" =~ ^[0-9]+$ ]] && [ "$1" -ge 1 ] && [ "$1" -le "$NODES" ] || usage; }

# Run scripts/cassandra.sh for node N with that node's settings.
node() {
  local n="$1"; shift
  # Fast start on an empty local cluster: no waiting for gossip to settle, a 1 s ring delay.
  CASS_DIR="$DIR/node$n" CASS_HOME="$DIR" CASS_ADDRESS="127.0.0.$n" CASS_PORT="$PORT" \
    CASS_STORAGE_PORT="$STORAGE_PORT" CASS_JMX_PORT="$((JMX_BASE + 100 * n))" \
    CASS_CLUSTER_NAME="flameup-cluster" CASS_SEEDS="127.0.0.1" CASS_NUM_TOKENS=16 CASS_HINTS=true \
    CASS_PHI="$PHI" CASS_HEAP="$HEAP" CASS_WAIT="$WAIT" \
    CASS_JVM_EXTRA="-Dcassandra.skip_wait_for_gossip_to_settle=0 -Dcassandra.ring_delay_ms=1000 ${CASS_JVM_EXTRA:-}" \
    "$ROOT/scripts/cassandra.sh" "$@"
}

# How many peers node N knows in its system.peers (empty when it does not answer).
peers() { python3 "$ROOT/scripts/cql_probe.py" "127.0.0.$1" "$PORT" "SELECT peer FROM system.peers" || true; }

cmd_up() {
  local n i
  for n in $(seq 1 "$NODES"); do node "$n" up; done  # one after another: each joins the ring it finds
  for i in $(seq 1 "$WAIT"); do
    local all=1
    for n in $(seq 1 "$NODES"); do [ "$(peers "$n")" = "$((NODES - 1))" ] || all=0; done
    if [ "$all" = 1 ]; then echo "cassandra cluster of $NODES up: 127.0.0.1-$NODES:$PORT"; return 0; fi
    sleep 1
  done
  echo "the nodes did not all see each other within ${WAIT}s" >&2
  return 1
}

cmd_down() {
  local n pids=() rc=0
  for n in $(seq 1 "$NODES"); do node "$n" down "$@" & pids+=($!); done  # at once: each flushes on its own
  for n in "${pids[@]}"; do wait "$n" || rc=1; done
  return "$rc"
}

cmd_status() {
  local n rc=0
  for n in $(seq 1 "$NODES"); do node "$n" status || rc=1; done
  return "$rc"
}

cmd_pid() {
  local f="$DIR/node$1/cassandra.pid" pid
  [ -f "$f" ] && pid="$(cat "$f")" && kill -0 "$pid" 2>/dev/null && echo "$pid"
}

cmd_nodetool() {
  local n="$1"; shift
  # nodetool of this bundle needs the legacy RMI URL parsing on Java 17.
  java -Xmx128m -Dcom.sun.jndi.rmiURLParsing=legacy -cp "$DIR/package/apache-cassandra-2.1.0/lib/*" \
    org.apache.cassandra.tools.NodeTool -h 127.0.0.1 -p "$((JMX_BASE + 100 * n))" "$@"
}

case "${1:-}" in
  up) shift; [ $# -eq 0 ] || usage; cmd_up ;;
  down) shift; cmd_down "$@" ;;
  kill) shift; [ $# -eq 1 ] || usage; node_ok "$1"; node "$1" down --kill ;;
  start) shift; [ $# -eq 1 ] || usage; node_ok "$1"; node "$1" up ;;
  status) shift; [ $# -eq 0 ] || usage; cmd_status ;;
  pid) shift; [ $# -eq 1 ] || usage; node_ok "$1"; cmd_pid "$1" ;;
  nodetool) shift; [ $# -ge 1 ] || usage; node_ok "$1"; cmd_nodetool "$@" ;;
  *) usage ;;
esac
