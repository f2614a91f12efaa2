#!/usr/bin/env bash
# Two `serve` instances over the local clusters (`make cluster-up` first): the
# same keyspace (RF 3, LOCAL_QUORUM), each with its own gRPC and REST ports, as
# two hosts behind a load balancer would run. Ctrl-C (or SIGTERM) stops both;
# when one instance dies the other keeps serving.
#
# Env knobs:
#   CLUSTER_STORE        store URL (default: the three nodes of scripts/cassandra-cluster.sh, keyspace flameup_events)
#   CLUSTER_GRPC_PORTS   gRPC ports of the two instances (default "50051 50052")
#   CLUSTER_HTTP_PORTS   REST ports (default "8080 8081")
#   CLUSTER_NATS_URL     the feed's NATS (default: the three servers of scripts/nats-cluster.sh);
#                        the feed's stream gets three replicas
#   CLUSTER_SERVE_ARGS   more flags for both, e.g. "--workers 1 --gateway-workers 1"
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PY:-$ROOT/.venv/bin/python}"
STORE="${CLUSTER_STORE:-cassandra://127.0.0.1,127.0.0.2,127.0.0.3:9142/flameup_events?protocol_version=3&local_dc=datacenter1&replication=datacenter1:3&consistency=LOCAL_QUORUM}"
read -r -a GRPC_PORTS <<< "${CLUSTER_GRPC_PORTS:-50051 50052}"
read -r -a HTTP_PORTS <<< "${CLUSTER_HTTP_PORTS:-8080 8081}"
read -r -a EXTRA <<< "${CLUSTER_SERVE_ARGS:-}"
if "$PY" -m service serve --help | grep -q -- --nats-url; then  # a tree with the feed
  EXTRA+=(--nats-url "${CLUSTER_NATS_URL:-nats://127.0.0.1:14222,nats://127.0.0.1:14223,nats://127.0.0.1:14224}" --feed-replicas 3)
fi

pids=()
stop() {
  trap - INT TERM
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait
}
trap stop INT TERM

healthy() { python3 "$ROOT/scripts/http_ok.py" "http://127.0.0.1:$1/healthz"; }

for i in 0 1; do
  "$PY" -m service serve --store "$STORE" --grpc-port "${GRPC_PORTS[$i]}" --http-port "${HTTP_PORTS[$i]}" \
    "${EXTRA[@]}" &
  pids+=($!)
  # One after another: the first prepares the keyspace, the second finds it ready.
  until healthy "${HTTP_PORTS[$i]}"; do
    kill -0 "${pids[$i]}" 2>/dev/null || { echo "instance $((i + 1)) exited during start" >&2; stop; exit 1; }
    sleep 0.5
  done
done
echo "two instances up: gRPC 127.0.0.1:${GRPC_PORTS[0]} and :${GRPC_PORTS[1]}, REST :${HTTP_PORTS[0]} and :${HTTP_PORTS[1]}"
wait
