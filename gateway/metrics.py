"""The gateway's Prometheus metrics: REST requests by method, route and status, and their latency.

Under ``serve`` they go to the same multiprocess files as the gRPC workers'
(PROMETHEUS_MULTIPROC_DIR) and ``/metrics`` serves the sum of all of them.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import Counter, Histogram
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HTTP_REQUESTS = Counter(
    "flameup_http_requests", "REST requests answered, by method, route and HTTP status", ["method", "route", "status"]
)
HTTP_LATENCY = Histogram(
    "flameup_http_request_seconds",
    "Time from a REST request's arrival in the gateway to the end of its answer, by route",
    ["route"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
)
UNMATCHED = "unmatched"  # a path no route takes: one label, whatever the path


class HttpMetrics:
    """Pure ASGI middleware counting every HTTP request (the route is the matched
    template, never the raw path, so the labels stay few)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._counters: dict[tuple[str, str, int], Any] = {}  # label children, resolved once
        self._latency: dict[str, Any] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start = time.perf_counter()
        status = 500  # unless a response starts

        async def sending(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            route = getattr(scope.get("route"), "path", UNMATCHED)
            key = (scope["method"], route, status)
            if (counter := self._counters.get(key)) is None:
                counter = self._counters[key] = HTTP_REQUESTS.labels(scope["method"], route, str(status))
            counter.inc()
            if (latency := self._latency.get(route)) is None:
                latency = self._latency[route] = HTTP_LATENCY.labels(route)
            latency.observe(time.perf_counter() - start)
