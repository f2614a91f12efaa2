// The TypeScript client against a running service: FLAMEUP_GRPC_URL (e.g.
// http://127.0.0.1:50051) and FLAMEUP_API_KEY (scopes events:read and
// events:write) come from tests/test_typescript_client.py.
import assert from "node:assert/strict";
import { randomUUID } from "node:crypto";
import { test } from "node:test";
import { Code, ConnectError } from "@connectrpc/connect";
import { timestampDate, timestampFromDate } from "@bufbuild/protobuf/wkt";
import { createEventsClient, fieldViolations } from "../src/client.js";

const baseUrl = process.env.FLAMEUP_GRPC_URL;
const apiKey = process.env.FLAMEUP_API_KEY;
assert.ok(baseUrl && apiKey, "set FLAMEUP_GRPC_URL and FLAMEUP_API_KEY");
const events = createEventsClient(baseUrl, apiKey);
const newExternalId = () => `ts_${randomUUID()}`;

test("Track records one event and parameters come back exactly", async () => {
  const externalId = newExternalId();
  const parameters = {
    order_id: "order_789", amount: 99.99, quantity: 2, paid: true, coupon: null,
    items: [{ sku: "PROD-001", tags: ["a", "b"] }],
  };
  const tracked = await events.track({ externalId, event: "purchase_completed", parameters });
  assert.equal(tracked.success, true);
  assert.match(tracked.eventId, /^evt_/);

  const page = await events.listPersonEvents({ personId: tracked.personId });
  assert.equal(page.total, 1);
  const [stored] = page.events;
  assert.equal(stored.id, tracked.eventId);
  assert.equal(stored.externalId, externalId);
  assert.equal(stored.event, "purchase_completed");
  assert.deepEqual(stored.parameters, parameters);
});

test("TrackBatch stores the valid events and says which one was rejected", async () => {
  const externalId = newExternalId();
  const batch = await events.trackBatch({
    events: [
      { externalId, event: "page_viewed", parameters: { page: "/pricing" } },
      { externalId, event: "" },
      { externalId, event: "signup_completed" },
    ],
  });
  assert.equal(batch.success, false);
  assert.equal(batch.eventIds.length, 3);
  assert.match(batch.eventIds[0], /^evt_/);
  assert.equal(batch.eventIds[1], "");
  assert.match(batch.eventIds[2], /^evt_/);
  assert.equal(batch.errors.length, 1);
  assert.equal(batch.errors[0].index, 1);
  assert.equal(batch.errors[0].field, "events[1].event");

  const page = await events.listPersonEvents({ personId: externalId, idType: "external_id" });
  assert.equal(page.total, 2);
  assert.deepEqual(new Set(page.events.map((e) => e.id)), new Set([batch.eventIds[0], batch.eventIds[2]]));
});

test("ListPersonEvents filters by event and time range, newest first, and pages", async () => {
  const externalId = newExternalId();
  const at = (minute: number) => new Date(Date.UTC(2026, 0, 15, 12, minute));
  const batch = await events.trackBatch({
    events: [0, 1, 2, 3].map((minute) => ({
      externalId, event: minute === 2 ? "page_viewed" : "feature_used", timestamp: at(minute).toISOString(),
    })),
  });
  assert.equal(batch.success, true);

  const filtered = await events.listPersonEvents({
    personId: externalId, idType: "external_id", event: "feature_used",
    since: timestampFromDate(at(1)), until: timestampFromDate(at(4)),
  });
  assert.equal(filtered.total, 2);
  assert.deepEqual(filtered.events.map((e) => e.timestamp && timestampDate(e.timestamp).toISOString()),
    [at(3).toISOString(), at(1).toISOString()]);

  const secondPage = await events.listPersonEvents({ personId: externalId, idType: "external_id", limit: 1, offset: 1 });
  assert.equal(secondPage.total, 4);
  assert.deepEqual(secondPage.events.map((e) => e.id), [batch.eventIds[2]]);
});

test("an invalid request fails with INVALID_ARGUMENT and a BadRequest detail naming the field", async () => {
  await assert.rejects(events.track({ externalId: newExternalId(), event: "" }), (err) => {
    assert.ok(err instanceof ConnectError);
    assert.equal(err.code, Code.InvalidArgument);
    assert.deepEqual(fieldViolations(err).map((v) => v.field), ["event"]);
    return true;
  });
});

test("StreamEvents delivers tracked events in store order; the client reads to the third", async () => {
  const externalId = newExternalId();
  const event = `stream_${randomUUID()}`; // a name of this test's own: the stream carries only these
  const since = timestampFromDate(new Date(Date.now() - 1000));
  const tracked: string[] = [];
  for (let i = 0; i < 3; i++) {
    tracked.push((await events.track({ externalId, event, parameters: { step: i } })).eventId);
  }

  const received: { id: string; cursor: string }[] = [];
  for await (const message of events.streamEvents({ events: [event], since })) {
    received.push({ id: message.event?.id ?? "", cursor: message.cursor });
    if (received.length === 3) break; // leaving the loop cancels the call
  }
  assert.deepEqual(received.map((m) => m.id), tracked);
  assert.ok(received.every((m) => m.cursor !== ""));

  // A cursor resumes after its event: from the first, the next two.
  const resumed: string[] = [];
  for await (const message of events.streamEvents({ events: [event], after: received[0].cursor })) {
    resumed.push(message.event?.id ?? "");
    if (resumed.length === 2) break;
  }
  assert.deepEqual(resumed, tracked.slice(1));
});
