"""The real-time feed: every stored event on a NATS JetStream stream, and StreamEvents.

- ``subjects``: the stream's configuration, subjects and the event-name token encoding.
- ``render``: an event as the JSON body ListPersonEvents returns for it.
- ``outbox``: reading stored events in store order after a checkpoint (the store is the outbox).
- ``publisher``: the publisher process: outbox -> JetStream, checkpoint after the acks.
- ``natsd``: the local nats-server `serve` starts when no NATS URL is given.
- ``consumer``: one StreamEvents call's view of the stream (an ephemeral pull consumer).

See docs/decisions/feed.md.
"""
