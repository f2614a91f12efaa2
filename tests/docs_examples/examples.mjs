// The JavaScript examples of the Flameup Events API documentation, as users
// copy them: only the host is BASE_URL, and lines marked "harness" are ours.
// Run by tests/test_docs_examples.py with Node 20 (global fetch).
const API_KEY = process.env.API_KEY; // harness
const BASE_URL = process.env.BASE_URL; // harness
const results = {}; // harness

// A new UUID per event; a retry of the same event sends the same one, and the
// service stores the event once (the answer says "duplicate": true).
async function trackEvent(externalId, eventName, parameters = {}, messageId = crypto.randomUUID()) {
  const response = await fetch(
    `${BASE_URL}/api/v1/track`,
    {
      method: 'POST',
      headers: {
        'Content-Type': 'application/json',
        'Authorization': `Bearer ${API_KEY}`
      },
      body: JSON.stringify({
        external_id: externalId,
        event: eventName,
        message_id: messageId,
        parameters: parameters
      })
    }
  );
  return response.json();
}

const externalId = process.env.EXTERNAL_ID; // harness: user_123 in the docs, unique per test run

// Track a page view
results.page_viewed = await trackEvent(externalId, 'page_viewed', {
  page: '/pricing',
  referrer: '/home'
});

// Track a purchase
results.purchase_completed = await trackEvent(externalId, 'purchase_completed', {
  order_id: 'order_789',
  amount: 99.99,
  currency: 'USD',
  items: [
    { sku: 'PROD-001', name: 'Widget', quantity: 2 },
    { sku: 'PROD-002', name: 'Gadget', quantity: 1 }
  ]
});

// Track a feature usage
results.feature_used = await trackEvent(externalId, 'feature_used', {
  feature: 'export_csv',
  duration_seconds: 45
});

// Common event examples
results.plan_upgraded = await trackEvent(externalId, 'plan_upgraded', {
  from_plan: 'free',
  to_plan: 'premium',
  annual: true
});
results.nps_submitted = await trackEvent(externalId, 'nps_submitted', {
  score: 9,
  feedback: 'Love the product!'
});

// Batch Track Events
{
  const response = await fetch(
    `${BASE_URL}/api/v1/track/batch`,
    {
      method: 'POST',
      headers: {
        'Content-Type': 'application/json',
        'Authorization': `Bearer ${API_KEY}`
      },
      body: JSON.stringify({
        events: [
          {
            external_id: externalId,
            event: 'page_viewed',
            message_id: crypto.randomUUID(),
            parameters: { page: '/home' }
          },
          {
            external_id: externalId,
            event: 'button_clicked',
            message_id: crypto.randomUUID(),
            parameters: { button: 'signup' }
          },
          {
            external_id: externalId + '_456',
            event: 'purchase_completed',
            message_id: crypto.randomUUID(),
            parameters: { amount: 99.99 }
          }
        ]
      })
    }
  );
  const result = await response.json();
  results.batch = result; // harness
}

// Get Person Events
{
  const personId = results.purchase_completed.person_id; // harness
  const params = new URLSearchParams({
    limit: '100',
    event: 'purchase_completed',
    since: '2024-01-01T00:00:00Z'
  });
  const response = await fetch(
    `${BASE_URL}/api/v1/people/${personId}/events?${params}`,
    {
      headers: {
        'Authorization': `Bearer ${API_KEY}`
      }
    }
  );
  const { events, total } = await response.json();
  results.person_events = { events, total }; // harness
}

console.log(JSON.stringify(results)); // harness
