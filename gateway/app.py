"""The REST gateway: a Starlette app that is a gRPC client, as grpc-gateway is.

Routes come from the ``google.api.http`` options of the proto (see
:mod:`gateway.rules`), JSON mapping from the message descriptors (see
:mod:`gateway.transcode`); nothing is written per endpoint. Per request the
gateway reads the body (at most ``max_body_bytes``, counted as it streams in),
builds the request message from the body, the path and the query string,
forwards ``Authorization`` (and ``X-Request-Id``) as gRPC metadata, calls the
method over a small pool of ``grpc.aio`` channels with a deadline, and writes
the response message as JSON. Each channel is its own HTTP/2 connection, taken
in turn, so one gateway worker spreads its calls over the gRPC worker
processes (one connection would pin it to one). Given several targets (``serve``
passes each worker's own Unix socket), the channels go to them in equal numbers.

Errors are a ``google.rpc.Status`` in JSON, as grpc-gateway writes them:
``{"code": 3, "message": "...", "details": [{"@type": ...}, ...]}``, with the
HTTP status from grpc-gateway's ``HTTPStatusFromCode`` table. The rich status
a service sends in ``grpc-status-details-bin`` (e.g. a ``google.rpc.BadRequest``)
is passed on; without one, the gRPC code and details text are used.

Choices where grpc-gateway and the API contract leave room:

- Wrong method on a known path: HTTP **405** with an ``Allow`` header and
  ``{"code": 12}`` (UNIMPLEMENTED, the code grpc-gateway uses). grpc-gateway
  answers 501 by default; 405 is what HTTP clients, caches and proxies
  understand, and RFC 9110 asks for ``Allow`` with it.
- Unknown path: 404 with ``{"code": 5}`` (NOT_FOUND); no trailing-slash
  redirects (grpc-gateway does not redirect either).
- Body over the limit: 413 with ``{"code": 8}`` (RESOURCE_EXHAUSTED), decided
  from ``Content-Length`` before reading when it is declared, else as soon as
  the running count passes the limit.
- An empty body where the rule takes one is a 400 (not JSON), where
  grpc-gateway would send an empty message.
- A GET route also answers HEAD (grpc-gateway: 501).
- 401 carries ``WWW-Authenticate: Bearer`` (grpc-gateway puts the status
  message there, which is not a valid challenge).
- An ``Authorization`` value that cannot travel as gRPC metadata (not
  printable ASCII) is a 401; such an ``X-Request-Id`` is dropped.
- Unexpected exceptions: 500 with ``{"code": 13, "message": "internal error"}``;
  the traceback goes to the log, never to the client.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any, TypedDict
from urllib.parse import parse_qsl

import grpc
import orjson
from google.protobuf.descriptor import FileDescriptor
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_health.v1 import health_pb2
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import BaseRoute, Route

from gateway import transcode
from gateway.openapi import openapi_document
from gateway.rules import Binding, bindings_for
from gateway.transcode import CodecRegistry, MessageCodec, TranscodeError

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_SECONDS = 10.0
DEFAULT_CHANNELS = 4
MAX_BODY_BYTES = 1024 * 1024
HEALTH_TIMEOUT_SECONDS = 2.0
# A page of 500 events of up to 32 KiB of parameters each is far above gRPC's
# default 4 MiB receive limit; the gateway must be able to read it.
MAX_RESPONSE_BYTES = 64 * 1024 * 1024
CHANNEL_OPTIONS: Sequence[tuple[str, Any]] = (
    ("grpc.max_receive_message_length", MAX_RESPONSE_BYTES),
    ("grpc.max_send_message_length", -1),
)
GRPC_DETAILS_KEY = "grpc-status-details-bin"
ERROR_DETAIL_TYPES = (error_details_pb2.BadRequest, error_details_pb2.RetryInfo)
JSON = "application/json"

# grpc-gateway's runtime.HTTPStatusFromCode.
HTTP_STATUS_BY_CODE: dict[int, int] = {
    code_pb2.OK: 200,
    code_pb2.CANCELLED: 499,
    code_pb2.UNKNOWN: 500,
    code_pb2.INVALID_ARGUMENT: 400,
    code_pb2.DEADLINE_EXCEEDED: 504,
    code_pb2.NOT_FOUND: 404,
    code_pb2.ALREADY_EXISTS: 409,
    code_pb2.PERMISSION_DENIED: 403,
    code_pb2.UNAUTHENTICATED: 401,
    code_pb2.RESOURCE_EXHAUSTED: 429,
    code_pb2.FAILED_PRECONDITION: 400,
    code_pb2.ABORTED: 409,
    code_pb2.OUT_OF_RANGE: 400,
    code_pb2.UNIMPLEMENTED: 501,
    code_pb2.INTERNAL: 500,
    code_pb2.UNAVAILABLE: 503,
    code_pb2.DATA_LOSS: 500,
}
# Errors the gateway itself raises as HTTP statuses, as gRPC codes.
_CODE_BY_HTTP_STATUS: dict[int, int] = {
    400: code_pb2.INVALID_ARGUMENT,
    401: code_pb2.UNAUTHENTICATED,
    403: code_pb2.PERMISSION_DENIED,
    404: code_pb2.NOT_FOUND,
    405: code_pb2.UNIMPLEMENTED,
    409: code_pb2.ABORTED,
    413: code_pb2.RESOURCE_EXHAUSTED,
    429: code_pb2.RESOURCE_EXHAUSTED,
    499: code_pb2.CANCELLED,
    501: code_pb2.UNIMPLEMENTED,
    503: code_pb2.UNAVAILABLE,
    504: code_pb2.DEADLINE_EXCEEDED,
}


def http_status_from_code(code: int) -> int:
    """The HTTP status for a gRPC code (grpc-gateway's table); unknown codes are 500."""
    return HTTP_STATUS_BY_CODE.get(code, 500)


def default_files() -> list[FileDescriptor]:
    from flameup.events.v1 import events_pb2

    return [events_pb2.DESCRIPTOR]


class GatewayState(TypedDict):
    """What the lifespan hands to every request (``request.state``)."""

    channels: list[grpc.aio.Channel]
    calls: Mapping[str, Iterator[grpc.aio.UnaryUnaryMultiCallable]]  # endless round-robin per method
    stream_calls: Mapping[str, Iterator[grpc.aio.UnaryStreamMultiCallable]]  # server-streaming methods
    health_check: grpc.aio.UnaryUnaryMultiCallable


class GatewayError(Exception):
    """An error the gateway answers itself, as a google.rpc.Status."""

    def __init__(
        self,
        code: int,
        message: str,
        *,
        details: Sequence[Any] = (),
        http_status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.details = list(details)  # google.protobuf.Any messages
        self.http_status = http_status or http_status_from_code(code)
        self.headers = headers or {}


def bad_request(exc: TranscodeError) -> GatewayError:
    """INVALID_ARGUMENT with a BadRequest detail naming the field."""
    status = status_pb2.Status()
    status.details.add().Pack(
        error_details_pb2.BadRequest(
            field_violations=[error_details_pb2.BadRequest.FieldViolation(field=exc.field, description=exc.description)]
        )
    )
    return GatewayError(code_pb2.INVALID_ARGUMENT, str(exc), details=status.details)


class ErrorRenderer:
    """google.rpc.Status JSON bodies."""

    def __init__(self, codecs: CodecRegistry) -> None:
        self._codecs = codecs

    def body(self, code: int, message: str, details: Iterable[Any] = ()) -> dict[str, Any]:
        return {
            "code": code,
            "message": message,
            "details": [self._codecs.any_to_json(detail) for detail in details],
        }

    def response(
        self,
        code: int,
        message: str,
        details: Iterable[Any] = (),
        *,
        http_status: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        body = self.body(code, message, details)
        headers = dict(headers or {})
        if code == code_pb2.UNAUTHENTICATED:
            headers.setdefault("WWW-Authenticate", "Bearer")
        return Response(
            orjson.dumps(body),
            status_code=http_status or http_status_from_code(code),
            headers=headers,
            media_type=JSON,
        )


def status_from_rpc_error(exc: grpc.aio.AioRpcError) -> status_pb2.Status:
    """The rich status from the trailers when it agrees with the call's code,
    else one built from the code and the details text."""
    code = exc.code().value[0]
    for key, value in exc.trailing_metadata() or ():
        if key == GRPC_DETAILS_KEY:
            try:
                rich = status_pb2.Status.FromString(value)
            except DecodeError:
                break
            if rich.code == code:
                return rich
            break
    return status_pb2.Status(code=code, message=exc.details() or "")


class Operation:
    """One binding, ready to serve: codecs, query rules and the call path."""

    def __init__(self, binding: Binding, codecs: CodecRegistry, timeout: float, max_body_bytes: int) -> None:
        self.binding = binding
        self.grpc_path = binding.grpc_path
        self.request_codec: MessageCodec = codecs.request(binding.method.input_type)
        self.response_codec: MessageCodec = codecs.get(binding.method.output_type)
        self.timeout = timeout
        self.max_body_bytes = max_body_bytes
        self.variables = binding.variables
        self.body = binding.body
        self.response_body = binding.response_body
        # grpc-gateway fills from the query string every field that neither the
        # path nor the body takes; with body "*" the body takes them all.
        self.uses_query = binding.body != "*"
        taken = {v.field_path.split(".")[0] for v in binding.variables}
        if binding.body and binding.body != "*":
            taken.add(binding.body.split(".")[0])
        self.query_skip = frozenset(key for name in taken for key in (name, self.request_codec.by_key[name].json_name))
        self.streaming = binding.method.server_streaming
        self.errors = ErrorRenderer(codecs)

    async def _stream(self, request: Request[GatewayState], msg: Any, metadata: list[tuple[str, str]]) -> Response:
        """A server-streaming call, as grpc-gateway transcodes one: newline-delimited
        ``{"result": ...}`` objects, or Server-Sent Events when the client accepts them.

        The response starts once the service sent its headers (it accepted the call);
        an error before that is an ordinary error response. The call has no deadline.
        """
        sse = "text/event-stream" in request.headers.get("accept", "")
        last_event_id = request.headers.get("last-event-id")
        if sse and last_event_id and "after" in self.request_codec.by_key:
            msg.after = last_event_id  # an EventSource reconnecting: resume after the last event it saw
            if "since" in self.request_codec.by_key:
                msg.ClearField("since")
        call = next(request.state["stream_calls"][self.grpc_path])(msg, metadata=metadata)
        try:
            await call.initial_metadata()
            if call.done():
                await call.read()  # raises the call's error; an empty stream ends here
        except BaseException:
            call.cancel()
            raise
        frames = _SseFrames(self.response_codec, self.errors) if sse else _JsonLines(self.response_codec, self.errors)
        return StreamingResponse(
            _relay(call, frames),
            media_type="text/event-stream" if sse else JSON,
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    async def __call__(self, request: Request[GatewayState]) -> Response:
        scope = request.scope
        authorization = request_id = content_length = None
        for key, value in scope["headers"]:
            if key == b"authorization":
                authorization = value
            elif key == b"content-length":
                content_length = value
            elif key == b"x-request-id":
                request_id = value

        codec = self.request_codec
        msg = codec.cls()
        try:
            if self.body:
                data = await self._read_json(request, content_length)
                if self.body == "*":
                    if type(data) is not dict:
                        raise GatewayError(
                            code_pb2.INVALID_ARGUMENT,
                            f"request body must be a JSON object, got {transcode.describe(data)}",
                        )
                    codec.fill(msg, data, 0, 0)
                else:
                    transcode.set_body_field(codec, msg, self.body, data)
            if self.uses_query and scope["query_string"]:
                pairs = parse_qsl(scope["query_string"].decode("utf-8", "replace"), keep_blank_values=True)
                transcode.populate_query(codec, msg, pairs, self.query_skip)
            if self.variables:
                path_params = scope["path_params"]
                for variable in self.variables:
                    transcode.set_field_from_string(codec, msg, variable.field_path, variable.value(path_params))
        except TranscodeError as exc:
            raise bad_request(exc) from None

        metadata: list[tuple[str, str]] = []
        if authorization is not None:
            text = authorization.decode("latin-1")
            if not (text.isascii() and text.isprintable()):
                raise GatewayError(code_pb2.UNAUTHENTICATED, "malformed authorization header: not printable ASCII")
            metadata.append(("authorization", text))
        if request_id is not None:
            text = request_id.decode("latin-1")
            if text.isascii() and text.isprintable():
                metadata.append(("x-request-id", text))

        if self.streaming:
            return await self._stream(request, msg, metadata)
        call = next(request.state["calls"][self.grpc_path])
        reply = await call(msg, timeout=self.timeout, metadata=metadata)
        if self.response_body:
            out = self.response_codec.field_to_json(reply, self.response_body)
        else:
            out = self.response_codec.to_json(reply)
        return Response(orjson.dumps(out), media_type=JSON)

    async def _read_json(self, request: Request[GatewayState], content_length: bytes | None) -> Any:
        limit = self.max_body_bytes
        if content_length is not None and content_length.isdigit() and int(content_length) > limit:
            raise _too_large(limit)
        chunks: list[bytes] = []
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
            if total > limit:
                raise _too_large(limit)
            chunks.append(chunk)
        raw = b"".join(chunks)
        if not raw.strip():
            raise GatewayError(code_pb2.INVALID_ARGUMENT, "request body is empty: send a JSON object")
        try:
            return orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            if "depth limit" in str(exc):
                message = f"request body: JSON nesting is deeper than {transcode.MAX_DEPTH} levels"
            else:
                message = f"request body is not valid JSON: {exc}"
            raise GatewayError(code_pb2.INVALID_ARGUMENT, message) from None


SSE_HEARTBEAT_SECONDS = 10.0
"""A comment line this often on an idle Server-Sent Events stream (keeps proxies from closing it)."""
STREAM_BUFFER = 16
"""Messages read ahead of a slow HTTP client; past that, gRPC flow control holds the service back."""


class _JsonLines:
    """grpc-gateway's server-streaming format: one JSON object per line."""

    def __init__(self, codec: MessageCodec, errors: ErrorRenderer) -> None:
        self.codec, self.errors = codec, errors

    def opening(self) -> bytes:
        return b""

    def message(self, reply: Any) -> bytes:
        return orjson.dumps({"result": self.codec.to_json(reply)}) + b"\n"

    def error(self, status: status_pb2.Status) -> bytes:
        return orjson.dumps({"error": self.errors.body(status.code, status.message, status.details)}) + b"\n"

    heartbeat = opening


class _SseFrames(_JsonLines):
    """Server-Sent Events: ``id:`` the message's cursor, ``data:`` its event (or the whole message)."""

    def opening(self) -> bytes:
        return b": stream open\n\n"

    def message(self, reply: Any) -> bytes:
        out = self.codec.to_json(reply)
        cursor = out.get("cursor", "")
        data = out.get("event", out)
        return b"id: " + cursor.encode() + b"\nevent: event\ndata: " + orjson.dumps(data) + b"\n\n"

    def error(self, status: status_pb2.Status) -> bytes:
        body = self.errors.body(status.code, status.message, status.details)
        return b"event: error\ndata: " + orjson.dumps(body) + b"\n\n"

    def heartbeat(self) -> bytes:
        return b": keep-alive\n\n"


async def _relay(call: Any, frames: _JsonLines) -> AsyncIterator[bytes]:
    """The call's messages as frames; an error as the last frame; the call ends with the response."""
    queue: asyncio.Queue[Any] = asyncio.Queue(STREAM_BUFFER)
    done = object()

    async def read() -> None:
        try:
            async for reply in call:
                await queue.put(reply)
            await queue.put(done)
        except grpc.aio.AioRpcError as exc:
            await queue.put(exc)
        except asyncio.CancelledError:
            raise

    reader = asyncio.create_task(read())
    try:
        if opening := frames.opening():
            yield opening
        while True:
            try:
                item = await asyncio.wait_for(queue.get(), SSE_HEARTBEAT_SECONDS)
            except TimeoutError:
                if beat := frames.heartbeat():
                    yield beat
                continue
            if item is done:
                return
            if isinstance(item, grpc.aio.AioRpcError):
                yield frames.error(status_from_rpc_error(item))
                return
            yield frames.message(item)
    finally:
        reader.cancel()
        call.cancel()


def _too_large(limit: int) -> GatewayError:
    return GatewayError(
        code_pb2.RESOURCE_EXHAUSTED,
        f"request body is larger than the limit of {limit} bytes",
        http_status=413,
    )


class PathEndpoint:
    """All bindings of one path template; dispatches on the HTTP method."""

    def __init__(self, operations: dict[str, Operation]) -> None:
        self.operations = operations
        if "GET" in operations and "HEAD" not in operations:
            self.operations = {**operations, "HEAD": operations["GET"]}

    async def handle(self, request: Request[GatewayState]) -> Response:
        # Starlette answers methods outside the route's list with 405 itself.
        return await self.operations[request.method](request)


def build_routes(
    bindings: Sequence[Binding], codecs: CodecRegistry, timeout: float, max_body_bytes: int
) -> list[Route]:
    """One Starlette route per path template, literal paths first."""
    by_path: dict[str, dict[str, Operation]] = {}
    for binding in bindings:
        by_path.setdefault(binding.route_path, {})[binding.http_method] = Operation(
            binding, codecs, timeout, max_body_bytes
        )
    ordered = sorted(by_path.items(), key=lambda item: item[0].count("{"))
    return [
        Route(path, PathEndpoint(operations).handle, methods=list(operations), name=path)
        for path, operations in ordered
    ]


def create_app(
    grpc_target: str | Sequence[str],
    *,
    timeout: float = DEFAULT_TIMEOUT_SECONDS,
    max_body_bytes: int = MAX_BODY_BYTES,
    files: Sequence[FileDescriptor] | None = None,
    channel_options: Sequence[tuple[str, Any]] = CHANNEL_OPTIONS,
    channels: int = DEFAULT_CHANNELS,
) -> Starlette:
    """The gateway for the services in ``files`` (default: flameup.events.v1),
    calling the gRPC server at ``grpc_target`` ("host:port", "unix:/path", or a
    list of them: at least ``channels`` channels, the same number to each).

    Raises :class:`gateway.transcode.UnsupportedTypeError` when a bound method's
    request or response uses a type the gateway does not transcode."""
    targets = [grpc_target] if isinstance(grpc_target, str) else list(grpc_target)
    if not targets:
        raise ValueError("create_app needs at least one gRPC target")
    # The generated document describes the default files; other files get no /openapi.json.
    openapi_body = openapi_document() if files is None else None
    files = list(files) if files is not None else default_files()
    codecs = CodecRegistry()
    for detail in ERROR_DETAIL_TYPES:  # what error bodies carry: fail here, not on the first error
        codecs.for_class(detail)
    bindings = bindings_for(files)
    errors = ErrorRenderer(codecs)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[GatewayState]:
        # A local subchannel pool per channel: otherwise grpc would share one connection.
        options = [*channel_options, ("grpc.use_local_subchannel_pool", 1)]
        per_target = -(-max(1, channels) // len(targets))  # ceil: every target gets as many
        pool = [grpc.aio.insecure_channel(target, options=options) for _ in range(per_target) for target in targets]
        try:

            def round_robin(streaming: bool) -> dict[str, Iterator[Any]]:
                """Each method's calls over every channel in turn (server-streaming ones, or the others)."""
                make = _unary_stream if streaming else _unary_unary
                return {
                    b.grpc_path: itertools.cycle(
                        [
                            make(
                                channel,
                                b.grpc_path,
                                codecs.get(b.method.input_type).cls,
                                codecs.get(b.method.output_type).cls,
                            )
                            for channel in pool
                        ]
                    )
                    for b in bindings
                    if b.method.server_streaming == streaming
                }

            calls, stream_calls = round_robin(False), round_robin(True)
            health_check = _unary_unary(
                pool[0], "/grpc.health.v1.Health/Check", health_pb2.HealthCheckRequest, health_pb2.HealthCheckResponse
            )
            log.info(
                "REST gateway calls gRPC at %s over %d channels (%d routes)",
                ", ".join(targets),
                len(pool),
                len(bindings),
            )
            yield {"channels": pool, "calls": calls, "stream_calls": stream_calls, "health_check": health_check}
        finally:
            for channel in pool:
                await channel.close(grace=1.0)

    async def healthz(request: Request[GatewayState]) -> Response:
        try:
            reply = await request.state["health_check"](
                health_pb2.HealthCheckRequest(service=""), timeout=HEALTH_TIMEOUT_SECONDS
            )
        except grpc.aio.AioRpcError as exc:
            body = {"status": "UNKNOWN", "error": f"{exc.code().name}: {exc.details()}"}
            return Response(orjson.dumps(body), status_code=503, media_type=JSON)
        status = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
        code = 200 if reply.status == health_pb2.HealthCheckResponse.SERVING else 503
        return Response(orjson.dumps({"status": status}), status_code=code, media_type=JSON)

    async def openapi(request: Request) -> Response:
        return Response(openapi_body, media_type=JSON)

    async def on_gateway_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, GatewayError)
        return errors.response(exc.code, exc.message, exc.details, http_status=exc.http_status, headers=exc.headers)

    async def on_rpc_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, grpc.aio.AioRpcError)
        status = status_from_rpc_error(exc)
        return errors.response(status.code, status.message, status.details)

    async def on_http_exception(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, HTTPException)
        code = _CODE_BY_HTTP_STATUS.get(exc.status_code, code_pb2.UNKNOWN)
        return errors.response(code, exc.detail, http_status=exc.status_code, headers=dict(exc.headers or {}))

    async def on_client_disconnect(request: Request, exc: Exception) -> Response:
        # Nobody reads this; it ends the request quietly (nginx's 499).
        return errors.response(code_pb2.CANCELLED, "client closed the request")

    async def on_unexpected(request: Request, exc: Exception) -> Response:
        # Starlette re-raises after this response, so the server logs the traceback.
        return errors.response(code_pb2.INTERNAL, "internal error")

    routes: list[BaseRoute] = [
        *build_routes(bindings, codecs, timeout, max_body_bytes),
        Route("/healthz", healthz, methods=["GET"]),
        *([Route("/openapi.json", openapi, methods=["GET"])] if openapi_body is not None else []),
    ]
    app = Starlette(
        routes=routes,
        exception_handlers={
            GatewayError: on_gateway_error,
            grpc.aio.AioRpcError: on_rpc_error,
            HTTPException: on_http_exception,
            ClientDisconnect: on_client_disconnect,
            Exception: on_unexpected,
        },
        lifespan=lifespan,
    )
    app.router.redirect_slashes = False
    return app


def _unary_unary(channel: grpc.aio.Channel, path: str, request_cls: Any, response_cls: Any):
    try:
        return channel.unary_unary(
            path,
            request_serializer=request_cls.SerializeToString,
            response_deserializer=response_cls.FromString,
            _registered_method=True,  # as the generated stubs do: cheaper per call
        )
    except TypeError:  # pragma: no cover - a grpcio without registered methods
        return channel.unary_unary(
            path, request_serializer=request_cls.SerializeToString, response_deserializer=response_cls.FromString
        )


def _unary_stream(channel: grpc.aio.Channel, path: str, request_cls: Any, response_cls: Any):
    return channel.unary_stream(
        path, request_serializer=request_cls.SerializeToString, response_deserializer=response_cls.FromString
    )
