"""Command line: `python -m service serve | migrate | grpc-worker | sqlite-writer | feed-publisher | keys ... |
workspaces ...`.

Every option of `serve` also reads an environment variable (FLAMEUP_STORE,
FLAMEUP_HOST, FLAMEUP_GRPC_PORT, FLAMEUP_HTTP_PORT, FLAMEUP_WORKERS,
FLAMEUP_GATEWAY_WORKERS, FLAMEUP_KEY_CACHE_SECONDS, FLAMEUP_CPU_POLICY,
FLAMEUP_WORKER_CPU_AFFINITY, FLAMEUP_DEDUP_WINDOW_DAYS, FLAMEUP_FEED, FLAMEUP_NATS_URL,
FLAMEUP_NATS_PORT, FLAMEUP_NATS_DATA_DIR, FLAMEUP_FEED_STREAM, FLAMEUP_FEED_MAX_AGE,
FLAMEUP_FEED_DUPLICATE_WINDOW, FLAMEUP_FEED_REPLICAS); a flag wins over the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import os
import sys
from datetime import UTC, datetime

import uvloop

from procutil.cpu import (
    CPU_POLICIES,
    DEFAULT_CPU_POLICY,
    DEFAULT_WORKER_CPU_AFFINITY,
    WORKER_CPU_AFFINITIES,
    keep_to_cpu,
)
from procutil.logs import LOG_FORMATS, configure_logging
from procutil.process import exit_with_parent, freeze_startup_heap
from service.domain import DEFAULT_DEDUP_WINDOW_DAYS
from service.feed.subjects import DEFAULT_DUPLICATE_WINDOW_S, DEFAULT_MAX_AGE_S, DEFAULT_STREAM, StreamSettings
from service.store import DEFAULT_STORE_URL, open_store, with_dedup_window
from service.supervisor import default_gateway_workers, default_workers, report_ready


def _env(name: str, default):
    value = os.environ.get(name)
    return type(default)(value) if value not in (None, "") else default


def _store_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--store",
        default=_env("FLAMEUP_STORE", DEFAULT_STORE_URL),
        help="store URL (env FLAMEUP_STORE; default %(default)s)",
    )


def _log_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--log-level", default=_env("FLAMEUP_LOG_LEVEL", "info"), choices=["debug", "info", "warning", "error"]
    )
    p.add_argument(
        "--log-format",
        default=_env("FLAMEUP_LOG_FORMAT", "text"),
        choices=LOG_FORMATS,
        help="text lines or one JSON object per line (env FLAMEUP_LOG_FORMAT; default %(default)s)",
    )


def _retention_days(text: str) -> int:
    from service.store.base import MAX_RETENTION_DAYS

    days = int(text)
    if not 1 <= days <= MAX_RETENTION_DAYS:
        raise argparse.ArgumentTypeError(f"must be 1 to {MAX_RETENTION_DAYS} days, got {days}")
    return days


def _retention_arg(p: argparse.ArgumentParser) -> None:
    env = os.environ.get("FLAMEUP_RETENTION_DAYS") or None
    p.add_argument(
        "--retention-days",
        type=_retention_days,
        default=env,  # argparse applies type to a string default too
        help="keep events of today and this many days before it; older ones are refused, hidden from"
        " reads and removed from the store with their counts (env FLAMEUP_RETENTION_DAYS; default: keep forever)",
    )


def _stream_args(p: argparse.ArgumentParser) -> None:
    """The feed stream's settings (docs: README, Triggering campaigns)."""
    p.add_argument(
        "--feed-stream",
        default=_env("FLAMEUP_FEED_STREAM", DEFAULT_STREAM),
        help="JetStream stream of the feed (env FLAMEUP_FEED_STREAM; default %(default)s)",
    )
    p.add_argument(
        "--feed-max-age",
        type=float,
        default=_env("FLAMEUP_FEED_MAX_AGE", float(DEFAULT_MAX_AGE_S)),
        help="seconds the stream keeps an event (env FLAMEUP_FEED_MAX_AGE; default 7 days)",
    )
    p.add_argument(
        "--feed-duplicate-window",
        type=float,
        default=_env("FLAMEUP_FEED_DUPLICATE_WINDOW", float(DEFAULT_DUPLICATE_WINDOW_S)),
        help="seconds the stream drops a republished event id (env FLAMEUP_FEED_DUPLICATE_WINDOW; default 1 day)",
    )
    p.add_argument(
        "--feed-replicas",
        type=int,
        default=_env("FLAMEUP_FEED_REPLICAS", 1),
        help="stream replicas on a NATS cluster (env FLAMEUP_FEED_REPLICAS; default 1)",
    )


def _stream_settings(args) -> StreamSettings:
    return StreamSettings(args.feed_stream, args.feed_max_age, args.feed_duplicate_window, args.feed_replicas)


def _serving() -> None:
    """A worker serves from now on."""
    freeze_startup_heap()
    report_ready()


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m service", description="Flameup Events service")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run gRPC workers and REST gateway workers")
    _store_arg(serve)
    serve.add_argument(
        "--host",
        default=_env("FLAMEUP_HOST", "127.0.0.1"),
        help="address to listen on (env FLAMEUP_HOST; 0.0.0.0 for all interfaces)",
    )
    serve.add_argument("--grpc-port", type=int, default=_env("FLAMEUP_GRPC_PORT", 50051))
    serve.add_argument("--http-port", type=int, default=_env("FLAMEUP_HTTP_PORT", 8080))
    serve.add_argument(
        "--workers",
        type=int,
        default=_env("FLAMEUP_WORKERS", default_workers()),
        help="gRPC worker processes (default: one per CPU)",
    )
    serve.add_argument(
        "--gateway-workers",
        type=int,
        default=_env("FLAMEUP_GATEWAY_WORKERS", default_gateway_workers()),
        help="REST gateway processes (default: one per two CPUs, at least one)",
    )
    serve.add_argument(
        "--key-cache-seconds",
        type=float,
        default=_env("FLAMEUP_KEY_CACHE_SECONDS", 10.0),
        help="how long a worker trusts a looked-up API key (revocations take this long)",
    )
    serve.add_argument(
        "--cpu-policy",
        choices=CPU_POLICIES,
        default=_env("FLAMEUP_CPU_POLICY", DEFAULT_CPU_POLICY),
        help="Linux scheduling policy of every service process (env FLAMEUP_CPU_POLICY;"
        " default %(default)s: SCHED_BATCH, fewer context switches under load)",
    )
    serve.add_argument(
        "--worker-cpu-affinity",
        choices=WORKER_CPU_AFFINITIES,
        default=_env("FLAMEUP_WORKER_CPU_AFFINITY", DEFAULT_WORKER_CPU_AFFINITY),
        help="auto: gRPC worker i runs on the i-th CPU (its threads hand calls to one another"
        " on one CPU); off: wherever the kernel puts it (env FLAMEUP_WORKER_CPU_AFFINITY)",
    )
    serve.add_argument(
        "--dedup-window-days",
        type=float,
        default=_env("FLAMEUP_DEDUP_WINDOW_DAYS", float(DEFAULT_DEDUP_WINDOW_DAYS)),
        help="how long a message_id is remembered, in days (env FLAMEUP_DEDUP_WINDOW_DAYS;"
        " default %(default)g; a store URL's dedup_window_days wins)",
    )
    _retention_arg(serve)
    serve.add_argument(
        "--feed",
        choices=("on", "off"),
        default=_env("FLAMEUP_FEED", "on"),
        help="the real-time feed: publish every stored event to NATS JetStream and serve"
        " StreamEvents (env FLAMEUP_FEED; default on)",
    )
    serve.add_argument(
        "--nats-url",
        default=_env("FLAMEUP_NATS_URL", ""),
        help="an existing NATS server or cluster (env FLAMEUP_NATS_URL); without it serve"
        " runs its own nats-server on the loopback",
    )
    serve.add_argument(
        "--nats-port",
        type=int,
        default=_env("FLAMEUP_NATS_PORT", 4222),
        help="port of serve's own nats-server (env FLAMEUP_NATS_PORT; 0: any free port)",
    )
    serve.add_argument(
        "--nats-data-dir",
        default=_env("FLAMEUP_NATS_DATA_DIR", ""),
        help="JetStream data of serve's own nats-server (env FLAMEUP_NATS_DATA_DIR;"
        " default: nats/ beside the SQLite file, else ./data/nats)",
    )
    _stream_args(serve)
    _log_arg(serve)

    migrate = sub.add_parser(
        "migrate",
        help="create or upgrade the store's schema (serve runs this first);"
        " with FLAMEUP_BOOTSTRAP_KEY set, also ensure that key",
    )
    _store_arg(migrate)
    _log_arg(migrate)

    worker = sub.add_parser("grpc-worker", help="one gRPC worker process (serve starts these)")
    _store_arg(worker)
    worker.add_argument(
        "--sqlite-writer",
        default=None,
        metavar="SOCKET",
        help="send appends to the SQLite writer process on this Unix socket (serve passes it)",
    )
    worker.add_argument("--host", default="127.0.0.1")
    worker.add_argument("--port", type=int, default=50051)
    worker.add_argument("--key-cache-seconds", type=float, default=10.0)
    worker.add_argument(
        "--unix-socket",
        default=None,
        help="also listen on this Unix socket (serve gives each worker one for the gateways)",
    )
    _retention_arg(worker)
    worker.add_argument(
        "--rate-limit-file",
        default=None,
        metavar="PATH",
        help="the ingest buckets shared with the other workers (serve passes it; default: this worker's own)",
    )
    worker.add_argument("--nats-url", default="", help="the feed's NATS (StreamEvents); none: the feed is off")
    _stream_args(worker)
    worker.add_argument(
        "--cpu", type=int, default=None, help="run on this CPU only (serve gives worker i the i-th CPU)"
    )
    _log_arg(worker)

    writer = sub.add_parser(
        "sqlite-writer", help="the one process that commits appends to a SQLite file (serve starts it)"
    )
    _store_arg(writer)
    writer.add_argument("--socket", required=True, help="Unix socket the workers send appends to")
    _retention_arg(writer)
    _log_arg(writer)

    publisher = sub.add_parser("feed-publisher", help="publish stored events to NATS JetStream (serve starts it)")
    _store_arg(publisher)
    publisher.add_argument("--nats-url", required=True)
    _stream_args(publisher)
    _log_arg(publisher)

    keys = sub.add_parser("keys", help="create, list and revoke API keys")
    keys_sub = keys.add_subparsers(dest="keys_command", required=True)
    create = keys_sub.add_parser("create", help="create a key (and its workspace); prints the key once")
    _store_arg(create)
    create.add_argument("--workspace", required=True, help="workspace id, e.g. ws_acme")
    create.add_argument("--scopes", default="events:read,events:write")
    listing = keys_sub.add_parser("list", help="list keys (ids, scopes, state; never the keys)")
    _store_arg(listing)
    listing.add_argument("--workspace")
    revoke = keys_sub.add_parser("revoke", help="revoke a key by its id")
    _store_arg(revoke)
    revoke.add_argument("key_id")

    workspaces = sub.add_parser("workspaces", help="list workspaces, set their ingest limits")
    ws_sub = workspaces.add_subparsers(dest="workspaces_command", required=True)
    _store_arg(ws_sub.add_parser("list", help="workspaces and their ingest limits"))
    limit = ws_sub.add_parser(
        "limit",
        help="set a workspace's ingest limit (events per second and a burst) or lift it;"
        " running workers apply it within --key-cache-seconds",
    )
    _store_arg(limit)
    limit.add_argument("workspace", help="workspace id, e.g. ws_acme")
    limit.add_argument("--events-per-second", type=float, help="the sustained rate")
    limit.add_argument("--burst", type=int, help="events admitted at once above the rate (default: one second's)")
    limit.add_argument("--none", action="store_true", help="lift the limit")
    return parser


async def _with_store(url: str, fn):
    store = open_store(url)
    await store.open()
    try:
        return await fn(store)
    finally:
        await store.close()


def _time(us: int | None) -> str:
    return "-" if us is None else datetime.fromtimestamp(us / 1e6, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


async def _keys(args) -> int:
    from service import auth

    if args.keys_command == "create":
        try:
            scopes = auth.parse_scopes(args.scopes)
            auth.check_workspace_id(args.workspace)
        except ValueError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        record, key = await _with_store(args.store, lambda s: auth.create_key(s, args.workspace, scopes))
        print(f"created key {record.key_id} for {record.workspace_id} with {','.join(sorted(scopes))}", file=sys.stderr)
        print("it is shown only this once; store it now:", file=sys.stderr)
        print(key)
        return 0
    if args.keys_command == "list":
        records = await _with_store(args.store, lambda s: s.list_keys(args.workspace))
        print(f"{'KEY ID':14} {'WORKSPACE':24} {'SCOPES':26} {'CREATED':21} REVOKED")
        for r in records:
            print(
                f"{r.key_id:14} {r.workspace_id:24} {','.join(sorted(r.scopes)):26} "
                f"{_time(r.created_at_us):21} {_time(r.revoked_at_us)}"
            )
        return 0
    from service.domain import now_us

    if await _with_store(args.store, lambda s: s.revoke_key(args.key_id, now_us())):
        print(f"key {args.key_id} revoked", file=sys.stderr)
        return 0
    print(f"error: no key with id {args.key_id}", file=sys.stderr)
    return 1


async def _workspaces(args) -> int:
    from service.domain import RateLimit

    if args.workspaces_command == "list":

        async def listing(store):
            return [(ws, await store.rate_limit(ws)) for ws in await store.list_workspaces()]

        for workspace_id, rate in await _with_store(args.store, listing):
            shown = "-" if rate is None else f"{rate.events_per_second:g}/s burst {rate.burst}"
            print(f"{workspace_id:24} {shown}")
        return 0
    if args.none == (args.events_per_second is not None):
        print("error: give --events-per-second (and optionally --burst), or --none", file=sys.stderr)
        return 2
    rate = None
    try:
        if not args.none:
            rate = RateLimit(args.events_per_second, 1 if args.burst is None else args.burst)  # checks the rate
            if args.burst is None:  # one second's worth
                rate = RateLimit(rate.events_per_second, max(1, math.ceil(rate.events_per_second)))
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not await _with_store(args.store, lambda s: s.set_rate_limit(args.workspace, rate)):
        print(f"error: no workspace {args.workspace}", file=sys.stderr)
        return 1
    shown = "lifted" if rate is None else f"{rate.events_per_second:g} events per second, burst {rate.burst}"
    print(f"ingest limit of {args.workspace}: {shown}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # argparse checks a flag's choices, not the environment's
    if getattr(args, "log_format", "text") not in LOG_FORMATS:
        build_parser().error(f"FLAMEUP_LOG_FORMAT must be one of {', '.join(LOG_FORMATS)}")
    configure_logging(getattr(args, "log_level", "info"), getattr(args, "log_format", "text"))
    if args.command == "serve":
        from service.supervisor import ServeConfig, serve

        # argparse checks a flag's value against its choices, not the environment's
        for env, value, choices in (
            ("FLAMEUP_CPU_POLICY", args.cpu_policy, CPU_POLICIES),
            ("FLAMEUP_WORKER_CPU_AFFINITY", args.worker_cpu_affinity, WORKER_CPU_AFFINITIES),
            ("FLAMEUP_FEED", args.feed, ("on", "off")),
        ):
            if value not in choices:
                build_parser().error(f"{env} must be one of {', '.join(choices)}, got {value!r}")

        try:
            days = args.dedup_window_days
            store_url = with_dedup_window(args.store, None if days == DEFAULT_DEDUP_WINDOW_DAYS else days)
            open_store(store_url)  # a bad URL or window fails here, with its reason
        except ValueError as exc:
            build_parser().error(str(exc))
        return serve(
            ServeConfig(
                store_url=store_url,
                host=args.host,
                grpc_port=args.grpc_port,
                http_port=args.http_port,
                workers=max(1, args.workers),
                gateway_workers=max(1, args.gateway_workers),
                bootstrap_key=os.environ.get("FLAMEUP_BOOTSTRAP_KEY") or None,
                key_cache_seconds=args.key_cache_seconds,
                log_level=args.log_level,
                log_format=args.log_format,
                retention_days=args.retention_days,
                cpu_policy=args.cpu_policy,
                worker_cpu_affinity=args.worker_cpu_affinity,
                feed=args.feed == "on",
                nats_url=args.nats_url or None,
                nats_port=args.nats_port,
                nats_data_dir=args.nats_data_dir or None,
                stream=_stream_settings(args),
            )
        )
    if args.command == "migrate":
        from service.store import StoreUnavailable
        from service.supervisor import prepare_store

        try:
            asyncio.run(prepare_store(args.store, os.environ.get("FLAMEUP_BOOTSTRAP_KEY") or None))
        except (ValueError, StoreUnavailable) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        return 0
    if args.command == "grpc-worker":
        if args.cpu is not None:
            keep_to_cpu(args.cpu)  # before gRPC starts a thread: each inherits the mask
        from service.server import GrpcConfig
        from service.server import serve as serve_grpc

        exit_with_parent()
        # The long-running processes run on uvloop, as the gateways do under uvicorn (and
        # as gRPC's own benchmark worker can): a few percent less CPU per call than
        # asyncio's own loop, the same behaviour otherwise (docs/decisions/worker-runtime.md).
        uvloop.run(
            serve_grpc(
                GrpcConfig(
                    args.store,
                    args.host,
                    args.port,
                    key_cache_seconds=args.key_cache_seconds,
                    unix_socket=args.unix_socket,
                    sqlite_writer=args.sqlite_writer,
                    rate_limit_file=args.rate_limit_file,
                    retention_days=args.retention_days,
                    nats_url=args.nats_url or None,
                    stream=_stream_settings(args),
                ),
                on_ready=_serving,
            )
        )
        return 0
    if args.command == "sqlite-writer":
        from service.store.sqlite_writer import serve_writer

        exit_with_parent()
        uvloop.run(serve_writer(args.store, args.socket, on_ready=_serving, retention_days=args.retention_days))
        return 0
    if args.command == "feed-publisher":
        from service.feed.natsd import lower_priority
        from service.feed.publisher import serve_publisher

        lower_priority()
        exit_with_parent()
        uvloop.run(serve_publisher(args.store, args.nats_url, _stream_settings(args), on_ready=_serving))
        return 0
    if args.command == "keys":
        return asyncio.run(_keys(args))
    return asyncio.run(_workspaces(args))


if __name__ == "__main__":
    sys.exit(main())
