"""The README's native NATS consumer, as users copy it: only the server is
NATS_URL, and lines marked "harness" are ours."""

import asyncio
import json
import os  # harness

import nats
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

NATS_URL = os.environ["NATS_URL"]  # harness: nats://127.0.0.1:4222 in the README


def trigger_campaigns(event):
    print(event["event"], event["id"], flush=True)


async def main():
    nc = await nats.connect(NATS_URL)
    js = nc.jetstream()
    # A durable consumer: the server remembers what it acknowledged, across restarts of both sides.
    sub = await js.pull_subscribe(
        "flameup.events.ws_default.purchase_completed",
        durable="campaigns",
        stream="FLAMEUP_EVENTS",
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, deliver_policy=DeliverPolicy.ALL, max_ack_pending=1000),
    )
    seen = set()  # after a crash an event may come twice: the same Nats-Msg-Id, the event id
    while True:
        try:
            messages = await sub.fetch(100, timeout=5)
        except nats.errors.TimeoutError:
            continue
        for msg in messages:
            event_id = msg.headers["Nats-Msg-Id"]
            if event_id not in seen:
                seen.add(event_id)
                trigger_campaigns(json.loads(msg.data))
            await msg.ack()
        break  # harness: one fetch is enough for the test
    await nc.close()


asyncio.run(main())
