"""The gRPC adapter: protobuf messages to the core and back, errors to status codes."""

from __future__ import annotations

import asyncio
import contextvars
import functools
import logging
import math
import time
from typing import Any

import grpc
from google.protobuf import json_format
from google.protobuf.message import DecodeError
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from flameup.events.v1 import events_pb2, events_pb2_grpc
from protoconv import struct_to_python
from service import domain, metrics
from service.auth import DELETE_PEOPLE, READ, WRITE, Authenticator, AuthError, Principal
from service.domain import NameStats, ValidationError
from service.events import CountsInput, EventsCore, ListInput, PersonRef, SummaryInput, TrackInput
from service.feed.consumer import CursorError, Feed, FeedUnavailable
from service.messages import event_message, set_micros
from service.ratelimit import SharedBuckets
from service.store import StoreUnavailable

log = logging.getLogger(__name__)

SERVICE_NAME = events_pb2.DESCRIPTOR.services_by_name["EventsService"].full_name
# Every RPC of EventsService needs a key with this scope. An RPC missing here
# is refused (fail closed); a test checks the table covers the proto.
REQUIRED_SCOPE = {
    "Track": WRITE,
    "TrackBatch": WRITE,
    "ListPersonEvents": READ,
    "GetPersonSummary": READ,
    "GetEventCounts": READ,
    "ListEventNames": READ,
    "StreamEvents": READ,
    "DeletePerson": DELETE_PEOPLE,
}
# The RPCs a workspace's ingest limit applies to, and how many events a request brings.
EVENTS_IN = {"Track": lambda request: 1, "TrackBatch": lambda request: len(request.events)}

MAX_STREAM_EVENTS = 100

_principal: contextvars.ContextVar[Principal] = contextvars.ContextVar("principal")


class AuthInterceptor(grpc.aio.ServerInterceptor):
    """Checks the API key and scope of every EventsService call, then the
    workspace's ingest limit, and counts the call in the metrics.

    Health and reflection stay open, as load balancers and grpcurl expect.
    """

    def __init__(self, authenticator: Authenticator, buckets: SharedBuckets) -> None:
        self._authenticator = authenticator
        self._buckets = buckets
        # method path -> its checking handler, built once (a handler is per method, not per call)
        self._handlers: dict[str, grpc.RpcMethodHandler] = {}

    async def intercept_service(self, continuation, handler_call_details):
        path = handler_call_details.method
        if (checked := self._handlers.get(path)) is not None:
            return checked
        handler = await continuation(handler_call_details)
        service, _, method = path.lstrip("/").partition("/")
        if service != SERVICE_NAME or handler is None or (handler.unary_unary is None and handler.unary_stream is None):
            return handler
        checked = self._handlers[path] = self._checking(method, handler)
        return checked

    def _checking(self, method: str, handler: grpc.RpcMethodHandler) -> grpc.RpcMethodHandler:
        """The handler with the key and scope checked before the servicer runs."""
        scope = REQUIRED_SCOPE.get(method)
        events_in = EVENTS_IN.get(method)
        deserialize = handler.request_deserializer
        latency = metrics.LATENCY.labels(method)
        answered: dict[grpc.StatusCode, Any] = {}  # code -> its counter, resolved once

        def tolerant_deserialize(data: bytes):
            # A message protobuf cannot decode (e.g. parameters nested past its
            # 100-level limit) would otherwise surface as UNKNOWN.
            try:
                return deserialize(data)
            except DecodeError as exc:
                return _Undecodable(str(exc))

        async def authenticate(request, context) -> None:
            if isinstance(request, _Undecodable):
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT,
                    f"the request cannot be decoded ({request.reason}); parameters may be nested at most "
                    f"{domain.MAX_PARAMETERS_DEPTH} levels deep",
                )
            if scope is None:
                await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"no scope grants {method}")
                return
            try:
                authorization = _metadata(context.invocation_metadata(), "authorization")
                principal = await self._authenticator.authenticate(authorization, scope)
            except AuthError as exc:
                code = grpc.StatusCode.UNAUTHENTICATED if exc.unauthenticated else grpc.StatusCode.PERMISSION_DENIED
                await context.abort(code, str(exc))
            except StoreUnavailable as exc:
                await context.abort(grpc.StatusCode.UNAVAILABLE, f"cannot check the API key now: {exc}")
            if principal.limit is not None and events_in is not None:
                wait = self._buckets.take(principal.workspace_id, events_in(request), principal.limit)
                if wait:
                    metrics.RATE_LIMITED.labels(method).inc()
                    await context.abort_with_status(rpc_status.to_status(_over_limit(principal, wait)))
            _principal.set(principal)

        def checked(inner):
            async def authenticated(request, context):
                start = time.perf_counter()
                code = grpc.StatusCode.UNKNOWN
                try:
                    await authenticate(request, context)
                    response = await inner(request, context)
                    code = context.code() or grpc.StatusCode.OK
                    return response
                except asyncio.CancelledError:
                    code = grpc.StatusCode.CANCELLED
                    raise
                except BaseException:
                    code = context.code() or grpc.StatusCode.UNKNOWN
                    raise
                finally:
                    if (counter := answered.get(code)) is None:
                        counter = answered[code] = metrics.REQUESTS.labels(method, code.name)
                    counter.inc()
                    latency.observe(time.perf_counter() - start)

            return authenticated

        make = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.unary_unary_rpc_method_handler
        return make(
            checked(handler.unary_stream or handler.unary_unary),
            request_deserializer=tolerant_deserialize,
            response_serializer=handler.response_serializer,
        )


class _Undecodable:
    def __init__(self, reason: str) -> None:
        self.reason = reason


def _metadata(metadata, name: str) -> str | None:
    for key, value in metadata or ():
        if key == name:
            return value
    return None


def _over_limit(principal: Principal, wait_s: float) -> status_pb2.Status:
    """RESOURCE_EXHAUSTED with a RetryInfo detail: when the call would be admitted."""
    assert principal.limit is not None
    delay = error_details_pb2.RetryInfo()
    delay.retry_delay.FromNanoseconds(math.ceil(wait_s * 1e9))
    status = status_pb2.Status(
        code=code_pb2.RESOURCE_EXHAUSTED,
        message=f"workspace {principal.workspace_id} is over its ingest limit of "
        f"{principal.limit.events_per_second:g} events per second (burst {principal.limit.burst}); "
        f"retry in {wait_s:.3f}s",
    )
    status.details.add().Pack(delay)
    return status


def _grpc_errors(method):
    """Map the core's exceptions to gRPC statuses: the caller learns what to fix."""

    @functools.wraps(method)
    async def wrapper(self, request, context):
        try:
            return await method(self, request, context)
        except ValidationError as exc:
            await context.abort_with_status(rpc_status.to_status(_bad_request(exc)))
        except StoreUnavailable as exc:
            log.warning("store unavailable in %s: %s", method.__name__, exc)
            await context.abort(grpc.StatusCode.UNAVAILABLE, "storage is unavailable; retry later")

    return wrapper


def _field_status(code: int, field: str, message: str) -> status_pb2.Status:
    """A status with a BadRequest detail naming one field."""
    return _bad_request(ValidationError(domain.FieldViolation(field, message)), code)


def _bad_request(exc: ValidationError, code: int = code_pb2.INVALID_ARGUMENT) -> status_pb2.Status:
    detail = error_details_pb2.BadRequest(
        field_violations=[
            error_details_pb2.BadRequest.FieldViolation(field=v.field, description=v.message) for v in exc.violations
        ]
    )
    status = status_pb2.Status(code=code, message=str(exc))
    status.details.add().Pack(detail)
    return status


class EventsServicer(events_pb2_grpc.EventsServiceServicer):
    def __init__(self, core: EventsCore, feed: Feed | None = None) -> None:
        self._core = core
        self._feed = feed  # None: the feed is off

    @_grpc_errors
    async def Track(self, request: events_pb2.TrackRequest, context) -> events_pb2.TrackResponse:
        result = await self._core.track(_principal.get().workspace_id, track_input(request))
        (metrics.DUPLICATES if result.duplicate else metrics.EVENTS_STORED).inc()
        return events_pb2.TrackResponse(
            success=True, event_id=result.event_id, person_id=result.person_id, duplicate=result.duplicate
        )

    @_grpc_errors
    async def TrackBatch(self, request: events_pb2.TrackBatchRequest, context) -> events_pb2.TrackBatchResponse:
        items = [track_input(item) for item in request.events]
        result = await self._core.track_batch(_principal.get().workspace_id, items, request.sent_at)
        metrics.EVENTS_STORED.inc(len(items) - len(result.errors) - len(result.duplicates))
        metrics.DUPLICATES.inc(len(result.duplicates))
        return events_pb2.TrackBatchResponse(
            success=not result.errors,
            event_ids=result.event_ids,
            errors=[events_pb2.BatchError(index=i, field=v.field, message=v.message) for i, v in result.errors],
            duplicates=result.duplicates,
        )

    @_grpc_errors
    async def ListPersonEvents(self, request: events_pb2.ListPersonEventsRequest, context):
        result = await self._core.list_person_events(_principal.get().workspace_id, list_input(request))
        return events_pb2.ListPersonEventsResponse(
            events=[event_message(e) for e in result.page.events],
            total=result.page.total,
            next_page_token=result.next_page_token,
        )

    @_grpc_errors
    async def StreamEvents(self, request: events_pb2.StreamEventsRequest, context) -> None:
        """Checks the request, finds where to start, sends the headers (the call is accepted:
        every event stored from now on is in it), then the events as they reach the stream."""
        workspace_id = _principal.get().workspace_id
        events = stream_filters(request)
        feed = self._feed
        if feed is None:
            await context.abort(grpc.StatusCode.FAILED_PRECONDITION, "the real-time feed is off on this service")
            return
        try:
            start = await feed.start_sequence(
                workspace_id, request.after, request.since.ToJsonString() if request.HasField("since") else None
            )
            await context.send_initial_metadata(())
            async for message in feed.messages(workspace_id, events, start):
                response = events_pb2.StreamEventsResponse(cursor=message.cursor)
                json_format.Parse(message.body, response.event, ignore_unknown_fields=True)
                await context.write(response)
        except CursorError as exc:
            code = code_pb2.OUT_OF_RANGE if exc.out_of_range else code_pb2.INVALID_ARGUMENT
            await context.abort_with_status(rpc_status.to_status(_field_status(code, "after", str(exc))))
        except FeedUnavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))

    @_grpc_errors
    async def GetPersonSummary(self, request: events_pb2.GetPersonSummaryRequest, context):
        summary = await self._core.person_summary(
            _principal.get().workspace_id,
            SummaryInput(
                person_ref=request.person_id,
                id_type=request.id_type,
                since_ns=_nanos(request, "since"),
                until_ns=_nanos(request, "until"),
            ),
        )
        resp = events_pb2.GetPersonSummaryResponse(
            person_id=summary.person_id,
            total=sum(s.count for s in summary.events),
            events=[_name_summary(s) for s in summary.events],
        )
        if summary.events:
            set_micros(resp.first_seen, min(s.first_us for s in summary.events))
            set_micros(resp.last_seen, summary.events[0].last_us)
        return resp

    @_grpc_errors
    async def GetEventCounts(self, request: events_pb2.GetEventCountsRequest, context):
        counts = await self._core.event_counts(
            _principal.get().workspace_id,
            CountsInput(
                event=request.event,
                interval=request.interval,
                since_ns=_nanos(request, "since"),
                until_ns=_nanos(request, "until"),
            ),
        )
        resp = events_pb2.GetEventCountsResponse(interval=counts.interval, total=counts.total)
        for b in counts.buckets:
            bucket = resp.buckets.add(count=b.count, unique_persons=b.unique_persons)
            set_micros(bucket.start, b.start_us)
        return resp

    @_grpc_errors
    async def ListEventNames(self, request: events_pb2.ListEventNamesRequest, context):
        names = await self._core.event_names(
            _principal.get().workspace_id, _nanos(request, "since"), _nanos(request, "until")
        )
        return events_pb2.ListEventNamesResponse(events=[_name_summary(s) for s in names])

    @_grpc_errors
    async def DeletePerson(self, request: events_pb2.DeletePersonRequest, context):
        principal = _principal.get()
        person_id, deleted = await self._core.delete_person(
            principal.workspace_id, PersonRef(request.person_id, request.id_type)
        )
        metrics.PEOPLE_DELETED.inc()
        metrics.EVENTS_DELETED.inc(deleted)
        if self._feed is not None:  # consumers of the feed forget the person too
            try:
                await self._feed.publish_deletion(principal.workspace_id, person_id, deleted)
            except FeedUnavailable as exc:
                await context.abort(
                    grpc.StatusCode.UNAVAILABLE,
                    f"the person's events are deleted, but {exc}; repeat the call to send the notice",
                )
        log.info(
            "deleted a person of %s (%d events) at the request of key %s",
            principal.workspace_id,
            deleted,
            principal.key_id,
        )
        return events_pb2.DeletePersonResponse(deleted_events=deleted)


def track_input(request: events_pb2.TrackRequest) -> TrackInput:
    parameters = struct_to_python(request.parameters) if request.HasField("parameters") else None
    return TrackInput(
        request.external_id, request.event, parameters, request.timestamp, request.message_id, request.sent_at
    )


def list_input(request: events_pb2.ListPersonEventsRequest) -> ListInput:
    return ListInput(
        person_ref=request.person_id,
        id_type=request.id_type,
        limit=request.limit if request.HasField("limit") else None,
        offset=request.offset if request.HasField("offset") else None,
        event=request.event,
        since_ns=_nanos(request, "since"),
        until_ns=_nanos(request, "until"),
        page_token=request.page_token,
    )


def stream_filters(request: events_pb2.StreamEventsRequest) -> list[str]:
    """The event names of a StreamEvents request, checked (ValidationError naming the field)."""
    violations: list[domain.FieldViolation] = []
    if request.after and request.HasField("since"):
        violations.append(domain.FieldViolation("after", "give after or since, not both"))
    if len(request.events) > MAX_STREAM_EVENTS:
        violations.append(domain.FieldViolation("events", f"at most {MAX_STREAM_EVENTS} event names"))
    if len(request.after) > 255:
        violations.append(domain.FieldViolation("after", "not a cursor of this feed"))
    for i, name in enumerate(request.events):
        try:
            domain.check_name(f"events[{i}]", name)
        except ValidationError as exc:
            violations.extend(exc.violations)
    if violations:
        raise ValidationError(*violations)
    return list(request.events)


def _nanos(request, field: str) -> int | None:
    """A Timestamp field in nanoseconds since the epoch; None when unset."""
    return getattr(request, field).ToNanoseconds() if request.HasField(field) else None


def _name_summary(s: NameStats) -> events_pb2.EventNameSummary:
    msg = events_pb2.EventNameSummary(event=s.event, count=s.count)
    set_micros(msg.first_seen, s.first_us)
    set_micros(msg.last_seen, s.last_us)
    return msg
