"""The use cases: track one event, track a batch, list a person's events, delete a person.

Plain Python in, plain Python out: the servicer adapts protobuf messages to
these calls, and these calls raise ValidationError (bad input) or
StoreUnavailable (retry later).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from service import domain
from service.domain import EventPage, EventQuery, FieldViolation, StoredEvent, ValidationError
from service.store import Store
from service.store.base import retention_cutoff


@dataclass(frozen=True, slots=True)
class TrackInput:
    """One event as a client sent it, before validation."""

    external_id: str
    event: str
    parameters: dict[str, Any] | None = None
    timestamp: str = ""  # RFC 3339; empty means "when received"


@dataclass(frozen=True, slots=True)
class BatchResult:
    event_ids: list[str]  # in request order, "" where rejected
    errors: list[tuple[int, FieldViolation]]  # (index, first violation) per rejected event


@dataclass(frozen=True, slots=True)
class ListInput:
    person_ref: str  # a person_id, or an external_id when id_type == "external_id"
    id_type: str = ""
    limit: int | None = None
    offset: int | None = None
    event: str = ""
    # Nanoseconds since the epoch, as the caller sent them: since < until is
    # checked on these, the store is asked in (rounded up) microseconds.
    since_ns: int | None = None
    until_ns: int | None = None


@dataclass(frozen=True, slots=True)
class PersonRef:
    person_ref: str  # a person_id, or an external_id when id_type == "external_id"
    id_type: str = ""


class EventsCore:
    """The use cases over one store. With ``retention_days``, events older than
    the retention (see service.store.base.retention_cutoff) are refused on the
    way in and left out of every read, while the store removes them."""

    def __init__(self, store: Store, clock=domain.now_us, retention_days: int | None = None) -> None:
        self._store = store
        self._clock = clock
        self._retention_days = retention_days

    def prepare(self, workspace_id: str, item: TrackInput, received_us: int, prefix: str = "") -> StoredEvent:
        """Validate one event and turn it into the row every store keeps.

        Collects every violation, each named by its field path under ``prefix``.
        """
        violations: list[FieldViolation] = []

        def check(fn, *args):
            try:
                return fn(*args)
            except ValidationError as exc:
                violations.extend(exc.violations)
                return None

        external_id = check(domain.check_name, f"{prefix}external_id", item.external_id)
        event = check(domain.check_name, f"{prefix}event", item.event)
        ts_us = received_us
        if item.timestamp:
            field = f"{prefix}timestamp"
            parsed = check(domain.parse_timestamp, field, item.timestamp)
            if parsed is not None:
                ts_us = check(domain.check_event_time, field, parsed, received_us)
            if ts_us is not None and self._retention_days is not None:
                ts_us = check(_check_retained, field, ts_us, retention_cutoff(received_us, self._retention_days),
                              self._retention_days)
        parameters = check(domain.canonical_parameters, f"{prefix}parameters", item.parameters)
        if violations:
            raise ValidationError(*violations)
        return StoredEvent(
            event_id=domain.new_event_id(received_us),
            workspace_id=workspace_id,
            person_id=domain.person_id_for(workspace_id, external_id),
            external_id=external_id,
            event=event,
            parameters=parameters,
            timestamp_us=ts_us,
            created_at_us=received_us,
        )

    async def track(self, workspace_id: str, item: TrackInput) -> StoredEvent:
        stored = self.prepare(workspace_id, item, self._clock())
        await self._store.append([stored])
        return stored

    async def track_batch(self, workspace_id: str, items: Sequence[TrackInput]) -> BatchResult:
        """Store every valid event of the batch; report the others one by one.

        The batch as a whole must hold 1 to 100 events, else nothing is stored.
        """
        if not domain.MIN_BATCH <= len(items) <= domain.MAX_BATCH:
            raise ValidationError.of(
                "events", f"must hold {domain.MIN_BATCH} to {domain.MAX_BATCH} events, got {len(items)}"
            )
        received_us = self._clock()
        accepted: list[StoredEvent] = []
        event_ids: list[str] = []
        errors: list[tuple[int, FieldViolation]] = []
        for index, item in enumerate(items):
            try:
                stored = self.prepare(workspace_id, item, received_us, prefix=f"events[{index}].")
            except ValidationError as exc:
                errors.append((index, exc.violations[0]))
                event_ids.append("")
                continue
            accepted.append(stored)
            event_ids.append(stored.event_id)
        await self._store.append(accepted)
        return BatchResult(event_ids, errors)

    async def list_person_events(self, workspace_id: str, req: ListInput) -> EventPage:
        query = self.list_query(workspace_id, req)
        if self._retention_days is not None:
            cutoff = retention_cutoff(self._clock(), self._retention_days)
            if query.until_us is not None and query.until_us <= cutoff:
                return EventPage([], 0)
            query = replace(query, since_us=max(cutoff, query.since_us or cutoff))
        return await self._store.list_events(query)

    async def delete_person(self, workspace_id: str, req: PersonRef) -> int:
        """Erase the person's events and what derives from them; how many events were removed."""
        violations: list[FieldViolation] = []
        person_id = _person_id(workspace_id, req.person_ref, req.id_type, violations)
        if violations:
            raise ValidationError(*violations)
        return await self._store.delete_person(workspace_id, person_id)

    @staticmethod
    def list_query(workspace_id: str, req: ListInput) -> EventQuery:
        violations: list[FieldViolation] = []
        person_id = _person_id(workspace_id, req.person_ref, req.id_type, violations)
        limit = domain.DEFAULT_LIMIT if req.limit is None else req.limit
        if not 1 <= limit <= domain.MAX_LIMIT:
            violations.append(FieldViolation("limit", f"must be between 1 and {domain.MAX_LIMIT}, got {limit}"))
        offset = 0 if req.offset is None else req.offset
        if offset < 0:
            violations.append(FieldViolation("offset", f"must not be negative, got {offset}"))
        if req.event:
            try:
                domain.check_name("event", req.event)
            except ValidationError as exc:
                violations.extend(exc.violations)
        if req.since_ns is not None and req.until_ns is not None and req.since_ns >= req.until_ns:
            violations.append(FieldViolation("since", "must be before until"))
        if violations:
            raise ValidationError(*violations)
        return EventQuery(
            workspace_id=workspace_id,
            person_id=person_id,
            limit=limit,
            offset=offset,
            event=req.event or None,
            since_us=_micros_ceil(req.since_ns),
            until_us=_micros_ceil(req.until_ns),
        )


def _check_retained(field: str, ts_us: int, cutoff_us: int, days: int) -> int:
    if ts_us < cutoff_us:
        raise ValidationError.of(
            field, f"is older than the {days} days this service keeps events for ({domain.format_timestamp(cutoff_us)})"
        )
    return ts_us


def _person_id(workspace_id: str, person_ref: str, id_type: str, violations: list[FieldViolation]) -> str:
    """The person_id a request names (by person_id or by external_id); "" with a violation added when invalid."""
    id_type = id_type or "person_id"
    if id_type not in domain.ID_TYPES:
        choices = ", ".join(domain.ID_TYPES)
        violations.append(FieldViolation("id_type", f"must be one of {choices}, got {id_type[:64]!r}"))
        return ""
    try:
        if id_type == "external_id":
            return domain.person_id_for(workspace_id, domain.check_name("person_id", person_ref))
        return domain.parse_person_id("person_id", person_ref)
    except ValidationError as exc:
        violations.extend(exc.violations)
        return ""


def _micros_ceil(ns: int | None) -> int | None:
    """Rounded up, so that `since` and `until` keep their meaning at the store's precision."""
    return None if ns is None else -(-ns // 1000)
