"""One REST gateway worker: ``python -m gateway --grpc-target HOST:PORT --port 8080``.

The worker opens its listening socket itself with ``SO_REUSEPORT``, so that
several worker processes can listen on the same port and the kernel spreads
connections between them; a supervisor starts as many as it wants.

It runs uvicorn's ``Server.serve(sockets=[sock])``: uvloop and httptools when
they are installed, asyncio and h11 otherwise. SIGTERM (or SIGINT) starts
uvicorn's graceful shutdown: stop accepting, finish in-flight requests (at
most ``--graceful-timeout`` seconds), close the gRPC channel, exit 0.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socket
import sys
from collections.abc import Sequence

import uvicorn

from gateway.app import DEFAULT_TIMEOUT_SECONDS, MAX_BODY_BYTES, create_app
from procutil.logs import LOG_FORMATS, configure_logging
from procutil.process import exit_with_parent, freeze_startup_heap

log = logging.getLogger("gateway")


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(prog="python -m gateway", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--grpc-target",
        action="append",
        help="the gRPC server, host:port or unix:/path; repeat it to spread the calls over several"
        " (env FLAMEUP_GRPC_TARGET; default 127.0.0.1:50051)",
    )
    parser.add_argument(
        "--host", default=env.get("FLAMEUP_HOST", "127.0.0.1"), help="address to listen on (env FLAMEUP_HOST)"
    )
    parser.add_argument(
        "--port",
        type=int,
        default=int(env.get("FLAMEUP_HTTP_PORT", "8080")),
        help="port to listen on; 0 picks a free one (env FLAMEUP_HTTP_PORT; default %(default)s)",
    )
    parser.add_argument(
        "--grpc-timeout",
        type=float,
        default=DEFAULT_TIMEOUT_SECONDS,
        help="deadline of each gRPC call in seconds (default %(default)s)",
    )
    parser.add_argument(
        "--max-body-bytes", type=int, default=MAX_BODY_BYTES, help="largest request body (default %(default)s)"
    )
    parser.add_argument(
        "--graceful-timeout",
        type=float,
        default=10.0,
        help="seconds to finish in-flight requests on SIGTERM (default %(default)s)",
    )
    parser.add_argument("--backlog", type=int, default=2048, help="listen backlog (default %(default)s)")
    parser.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="default %(default)s",
    )
    parser.add_argument("--log-format", default="text", choices=LOG_FORMATS, help="text lines or JSON objects")
    parser.add_argument("--access-log", action="store_true", help="log every request (off by default)")
    return parser.parse_args(argv)


def bind_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A listening TCP socket with SO_REUSEPORT, shareable with sibling workers."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(backlog)
        sock.setblocking(False)
        sock.set_inheritable(True)
    except BaseException:
        sock.close()
        raise
    return sock


class _Server(uvicorn.Server):
    """uvicorn's server, saying where it listens once it really does."""

    def __init__(self, config: uvicorn.Config, host: str, port: int) -> None:
        super().__init__(config)
        self._where = (host, port)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started:
            freeze_startup_heap()
            host, port = self._where
            shown = f"[{host}]" if ":" in host else host
            log.info("REST gateway listening on http://%s:%d", shown, port)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    exit_with_parent()
    configure_logging(args.log_level, args.log_format)
    sock = bind_socket(args.host, args.port, args.backlog)
    port = sock.getsockname()[1]
    targets = args.grpc_target or [os.environ.get("FLAMEUP_GRPC_TARGET", "127.0.0.1:50051")]
    app = create_app(targets, timeout=args.grpc_timeout, max_body_bytes=args.max_body_bytes)
    config = uvicorn.Config(
        app,
        loop="auto",
        http="auto",
        lifespan="on",
        log_level=args.log_level,
        # JSON: uvicorn's loggers go through the root logger's handler, not uvicorn's own text ones
        log_config=None if args.log_format == "json" else uvicorn.config.LOGGING_CONFIG,
        access_log=args.access_log,
        timeout_graceful_shutdown=args.graceful_timeout,
        backlog=args.backlog,
        server_header=False,
    )
    server = _Server(config, args.host, port)
    # uvicorn takes over SIGTERM/SIGINT while it serves and re-raises the
    # signal once it has shut down; with these no-op handlers in place that
    # re-raise is harmless and a graceful stop exits 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: None)
    server.run(sockets=[sock])
    return 0 if server.started else 1


if __name__ == "__main__":
    sys.exit(main())
