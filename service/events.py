"""The use cases: track one event, track a batch, list a person's events.

Plain Python in, plain Python out: the servicer adapts protobuf messages to
these calls, and these calls raise ValidationError (bad input) or
StoreUnavailable (retry later).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from service import domain
from service.domain import EventPage, EventQuery, FieldViolation, StoredEvent, ValidationError
from service.store import Store


@dataclass(frozen=True, slots=True)
class TrackInput:
    """One event as a client sent it, before validation."""

    external_id: str
    event: str
    parameters: dict[str, Any] | None = None
    timestamp: str = ""  # RFC 3339; empty means "when received"
    message_id: str = ""  # empty: never deduplicated
    sent_at: str = ""  # RFC 3339, the client's clock when it sent the event; empty: no correction


@dataclass(frozen=True, slots=True)
class TrackResult:
    event_id: str
    person_id: str
    duplicate: bool  # True: nothing was stored; the ids are the original event's


@dataclass(frozen=True, slots=True)
class BatchResult:
    event_ids: list[str]  # in request order, "" where rejected, the original's id for a duplicate
    errors: list[tuple[int, FieldViolation]]  # (index, first violation) per rejected event
    duplicates: list[int]  # indexes of the duplicates, ascending


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
    page_token: str = ""


@dataclass(frozen=True, slots=True)
class ListResult:
    page: EventPage
    next_page_token: str  # "" on the last page


class EventsCore:
    def __init__(self, store: Store, clock=domain.now_us) -> None:
        self._store = store
        self._clock = clock

    def prepare(self, workspace_id: str, item: TrackInput, received_us: int, prefix: str = "",
                skew_us: int = 0) -> StoredEvent:
        """Validate one event and turn it into the row every store keeps.

        Collects every violation, each named by its field path under ``prefix``.
        ``skew_us`` corrects the timestamp when the event has no sent_at of its
        own (a batch's sent_at); the event's own sent_at wins over it.
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
        if item.sent_at:
            skew_us = check(domain.clock_skew, f"{prefix}sent_at", item.sent_at, received_us)
        ts_us = received_us
        if item.timestamp:
            field = f"{prefix}timestamp"
            parsed = check(domain.parse_timestamp, field, item.timestamp)
            if parsed is not None and skew_us is not None:
                ts_us = check(domain.check_event_time, field, parsed + skew_us, received_us)
        message_id = check(domain.check_name, f"{prefix}message_id", item.message_id) if item.message_id else None
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
            message_id=message_id,
        )

    async def track(self, workspace_id: str, item: TrackInput) -> TrackResult:
        stored = self.prepare(workspace_id, item, self._clock())
        (original,) = await self._store.append([stored])
        if original is not None:
            return TrackResult(*original, duplicate=True)
        return TrackResult(stored.event_id, stored.person_id, duplicate=False)

    async def track_batch(self, workspace_id: str, items: Sequence[TrackInput], sent_at: str = "") -> BatchResult:
        """Store every valid event of the batch; report the others one by one.

        The batch as a whole must hold 1 to 100 events and a valid ``sent_at``
        (when given), else nothing is stored. Of two events of the batch with
        the same message_id the first is appended and the second answered as
        its duplicate.
        """
        if not domain.MIN_BATCH <= len(items) <= domain.MAX_BATCH:
            raise ValidationError.of(
                "events", f"must hold {domain.MIN_BATCH} to {domain.MAX_BATCH} events, got {len(items)}"
            )
        received_us = self._clock()
        skew_us = domain.clock_skew("sent_at", sent_at, received_us) if sent_at else 0
        accepted: list[tuple[int, StoredEvent]] = []  # (index, event) of the events to append
        copies: list[tuple[int, int]] = []  # (index, index of the batch's first event with its message_id)
        first_of: dict[str, int] = {}
        event_ids: list[str] = []
        errors: list[tuple[int, FieldViolation]] = []
        for index, item in enumerate(items):
            try:
                stored = self.prepare(workspace_id, item, received_us, prefix=f"events[{index}].", skew_us=skew_us)
            except ValidationError as exc:
                errors.append((index, exc.violations[0]))
                event_ids.append("")
                continue
            event_ids.append(stored.event_id)
            if stored.message_id is not None:
                if (first := first_of.get(stored.message_id)) is not None:
                    copies.append((index, first))
                    continue
                first_of[stored.message_id] = index
            accepted.append((index, stored))
        originals = await self._store.append([stored for _, stored in accepted])
        duplicates = []
        for (index, _), original in zip(accepted, originals, strict=True):
            if original is not None:
                event_ids[index] = original[0]
                duplicates.append(index)
        for index, first in copies:
            event_ids[index] = event_ids[first]
            duplicates.append(index)
        return BatchResult(event_ids, errors, sorted(duplicates))

    async def list_person_events(self, workspace_id: str, req: ListInput) -> ListResult:
        q = self.list_query(workspace_id, req)
        page = await self._store.list_events(q)
        more = page.more if q.after is not None else q.offset + len(page.events) < page.total
        return ListResult(page, domain.page_token(q, page.events[-1]) if more and page.events else "")

    @staticmethod
    def list_query(workspace_id: str, req: ListInput) -> EventQuery:
        violations: list[FieldViolation] = []
        id_type = req.id_type or "person_id"
        person_id = ""
        if id_type not in domain.ID_TYPES:
            violations.append(FieldViolation("id_type", f"must be one of {', '.join(domain.ID_TYPES)}, got {req.id_type[:64]!r}"))
        else:
            try:
                if id_type == "external_id":
                    person_id = domain.person_id_for(workspace_id, domain.check_name("person_id", req.person_ref))
                else:
                    person_id = domain.parse_person_id("person_id", req.person_ref)
            except ValidationError as exc:
                violations.extend(exc.violations)
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
        if req.page_token and offset > 0:
            violations.append(FieldViolation("page_token", "cannot be combined with an offset: pass one or the other"))
        if violations:
            raise ValidationError(*violations)
        q = EventQuery(
            workspace_id=workspace_id,
            person_id=person_id,
            limit=limit,
            offset=offset,
            event=req.event or None,
            since_us=_micros_ceil(req.since_ns),
            until_us=_micros_ceil(req.until_ns),
        )
        if req.page_token:
            after = domain.parse_page_token("page_token", req.page_token, q)
            if q.until_us is not None:  # an edited token cannot reach past the window (stores rely on it)
                after = min(after, (q.until_us, ""))
            q = dataclasses.replace(q, after=after)
        return q


def _micros_ceil(ns: int | None) -> int | None:
    """Rounded up, so that `since` and `until` keep their meaning at the store's precision."""
    return None if ns is None else -(-ns // 1000)
