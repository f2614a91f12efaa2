"""One gRPC worker process: the events service, health and reflection."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from flameup.events.v1 import events_pb2_grpc
from service.auth import Authenticator
from service.events import EventsCore
from service.feed.consumer import Feed
from service.feed.subjects import StreamSettings
from service.servicer import SERVICE_NAME, AuthInterceptor, EventsServicer
from service.store import open_store

log = logging.getLogger(__name__)

# Twice gRPC's default: a batch of 100 events with 32 KiB of parameters each
# fits, and so does any 1 MiB REST body (JSON like [0,0,...] grows about 5x
# as protobuf).
MAX_MESSAGE_BYTES = 8 * 1024 * 1024


@dataclass(frozen=True)
class GrpcConfig:
    store_url: str
    host: str = "127.0.0.1"
    port: int = 50051
    grace_seconds: float = 10.0
    key_cache_seconds: float = 10.0
    unix_socket: str | None = None  # a second listener, this worker's own (the gateways call it)
    sqlite_writer: str | None = None  # the SQLite writer process's socket: appends go there (see open_store)
    nats_url: str | None = None  # the feed's NATS (StreamEvents); None: the feed is off
    stream: StreamSettings = StreamSettings()


async def serve(
    config: GrpcConfig, stop: asyncio.Event | None = None, on_ready: Callable[[], None] | None = None
) -> None:
    """Serve until SIGTERM/SIGINT (or ``stop``), then shut down gracefully.

    Shutdown order: health goes NOT_SERVING, the server stops taking calls and
    lets in-flight ones finish (up to the grace period), then the store
    commits what it holds and closes. Nothing acknowledged is lost.
    """
    store = open_store(config.store_url, sqlite_writer=config.sqlite_writer)
    await store.open()
    feed = Feed(config.nats_url, config.stream) if config.nats_url else None
    if feed is not None:
        await feed.start()  # connects in the background: StreamEvents is UNAVAILABLE until then
    health_servicer = health.aio.HealthServicer()
    server = grpc.aio.server(
        interceptors=[AuthInterceptor(Authenticator(store, config.key_cache_seconds))],
        options=[
            ("grpc.so_reuseport", 1),  # several worker processes share one port
            ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
        ],
    )
    events_pb2_grpc.add_EventsServiceServicer_to_server(EventsServicer(EventsCore(store), feed), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection([SERVICE_NAME, health.SERVICE_NAME, reflection.SERVICE_NAME], server)
    port = server.add_insecure_port(f"{config.host}:{config.port}")
    if config.unix_socket is not None:
        server.add_insecure_port(f"unix:{config.unix_socket}")
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info("gRPC worker serving on %s:%d", config.host, port)
    if on_ready is not None:
        on_ready()

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        log.info("gRPC worker shutting down")
        await health_servicer.enter_graceful_shutdown()
        await server.stop(config.grace_seconds)
        if feed is not None:
            await feed.close()
        await store.close()
        log.info("gRPC worker stopped")
