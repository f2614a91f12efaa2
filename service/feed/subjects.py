"""The feed stream's shape: its configuration, subjects and the event-name token.

Subjects: ``flameup.events.<workspace_id>.<event token>`` for events and
``flameup.deletions.<workspace_id>`` for deletion notices. A workspace id is
``ws_`` and lowercase letters, digits and underscores, a valid token as it is.

The event token encodes an event name (any Unicode, with ``.``, ``*``, ``>``,
spaces...) into one NATS subject token, reversibly: the name's UTF-8 bytes,
where ASCII letters, digits, ``-`` and ``_`` stand for themselves and every
other byte is ``%`` and two uppercase hex digits (percent-encoding, with ``.``
and ``~`` encoded too). ``purchase_completed`` stays ``purchase_completed``;
``page.view`` is ``page%2Eview``; ``größe`` is ``gr%C3%B6%C3%9Fe``.
:func:`decode_token` (``urllib.parse.unquote``) gives the name back.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from urllib.parse import unquote

SUBJECT_PREFIX = "flameup.events"
DELETIONS_PREFIX = "flameup.deletions"
DEFAULT_STREAM = "FLAMEUP_EVENTS"
DEFAULT_MAX_AGE_S = 7 * 86_400
DEFAULT_DUPLICATE_WINDOW_S = 86_400

_PLAIN = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
_TOKEN = re.compile(r"(?:[A-Za-z0-9_-]|%[0-9A-F]{2})+")


@functools.lru_cache(maxsize=65_536)  # a workspace has few event names; the publisher encodes each event's
def encode_token(name: str) -> str:
    """An event name as one NATS subject token (see the module docstring)."""
    return "".join(chr(b) if b in _PLAIN else f"%{b:02X}" for b in name.encode("utf-8"))


def decode_token(token: str) -> str:
    """The event name a token stands for; ValueError when it is no token of ours."""
    if not _TOKEN.fullmatch(token):
        raise ValueError(f"not an event token: {token!r}")
    return unquote(token, errors="strict")


@functools.lru_cache(maxsize=65_536)
def event_subject(workspace_id: str, event: str) -> str:
    return f"{SUBJECT_PREFIX}.{workspace_id}.{encode_token(event)}"


def event_filters(workspace_id: str, events: list[str] | tuple[str, ...] = ()) -> list[str]:
    """The subjects of a workspace's events, only the given names when there are any."""
    if not events:
        return [f"{SUBJECT_PREFIX}.{workspace_id}.*"]
    return sorted({event_subject(workspace_id, e) for e in events})


def deletion_subject(workspace_id: str) -> str:
    return f"{DELETIONS_PREFIX}.{workspace_id}"


@dataclass(frozen=True)
class StreamSettings:
    """The one stream every event goes to (declared idempotently by the publisher).

    ``max_age_s``: retention (default 7 days); ``duplicate_window_s``: how long
    JetStream drops a second publish of the same ``Nats-Msg-Id`` (default 1 day:
    longer than any outage the publisher catches up after without duplicates).
    """

    name: str = DEFAULT_STREAM
    max_age_s: float = DEFAULT_MAX_AGE_S
    duplicate_window_s: float = DEFAULT_DUPLICATE_WINDOW_S
    replicas: int = 1

    @property
    def subjects(self) -> list[str]:
        return [f"{SUBJECT_PREFIX}.>", f"{DELETIONS_PREFIX}.>"]

    def as_args(self) -> list[str]:
        """The command-line options that carry these settings to a child process."""
        return [
            "--feed-stream",
            self.name,
            "--feed-max-age",
            str(self.max_age_s),
            "--feed-duplicate-window",
            str(self.duplicate_window_s),
            "--feed-replicas",
            str(self.replicas),
        ]
