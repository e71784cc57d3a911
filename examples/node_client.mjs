// Calling the purchase service from Node.js with jayson, an npm JSON-RPC 2.0 client.
//
// jayson's promise client sends one call with `client.request(method, params)` and a
// batch with `client.request([...])`, where each item is built (not sent) by
// `client.request(method, params, id, false)`. The bearer token goes in the HTTP headers.
// Every call resolves to the whole response object: `{result}` or `{error}`.
//
// It buys a course as a shop's frontend would: creates a purchase, sees that fulfilling it
// without a payment is refused (402), pays through the example payment provider
// (examples/payment_provider.py), fulfils with the signed payment event the provider
// gave it, and reads the purchase's history (purchase.events).
//
// Start the server with demo data and the example payment provider first (see the
// README), then:
//   npm ci --prefix examples        # installs jayson into examples/node_modules
//   node examples/node_client.mjs
// Settings: RPC_URL (default http://127.0.0.1:8080/rpc), TOKEN (default demo-alice; a buyer
// not yet registered for every course), PROVIDER_URL (default http://127.0.0.1:8090).
// Exits non-zero if any answer is not the one it expects.

import { randomUUID } from 'node:crypto';
import { isDeepStrictEqual } from 'node:util';
// jayson is CommonJS without an exports map: ES modules name the file itself.
import jayson from 'jayson/promise/index.js';

const RPC_URL = new URL(process.env.RPC_URL || 'http://127.0.0.1:8080/rpc');
const TOKEN = process.env.TOKEN || 'demo-alice';
const PROVIDER_URL = process.env.PROVIDER_URL || 'http://127.0.0.1:8090';

class RpcError extends Error {
  constructor(method, error) {
    super(`${method}: ${error.code} ${error.message} ${JSON.stringify(error.data ?? null)}`);
    this.error = error;
  }
}

function connect(url, token) {
  const options = {
    hostname: url.hostname,
    port: url.port || undefined,
    path: url.pathname + url.search,
    headers: { Authorization: `Bearer ${token}` },
    timeout: 30_000,
  };
  return url.protocol === 'https:' ? jayson.client.https(options) : jayson.client.http(options);
}

const client = connect(RPC_URL, TOKEN);

// call: one request; resolves to its result, rejects with RpcError on an error answer.
async function call(method, params) {
  const response = await client.request(method, params);
  if (response.error) throw new RpcError(method, response.error);
  return response.result;
}

function expect(condition, message) {
  if (!condition) throw new Error(`unexpected answer: ${message}`);
}

// refused: a call that must answer the error `code`; resolves to that error.
async function refused(method, params, code) {
  const response = await client.request(method, params);
  expect(response.error, `${method} ${JSON.stringify(params)} should have failed with ${code}`);
  const { error } = response;
  console.log(`error: code=${error.code} message=${error.message} data=${JSON.stringify(error.data)}`);
  expect(error.code === code, `expected ${code}, got ${error.code}`);
  return error;
}

// pay: pay at the payment provider, which answers with the signed payment event (the
// proof). It also posts the same event to the shop's webhook: whichever arrives first
// fulfils, the other changes nothing. (Node's fetch: the bearer token is not sent there.)
async function pay(purchaseId) {
  const response = await fetch(new URL('/pay', PROVIDER_URL), {
    method: 'POST',
    headers: { 'Content-Type': 'application/json' },
    body: JSON.stringify({ purchase_id: purchaseId }),
  });
  const answer = await response.json();
  expect(response.ok, `the payment provider answered ${response.status}: ${JSON.stringify(answer)}`);
  return answer;
}

async function main() {
  const courses = await call('course.list');
  console.log('course.list:', courses.map((course) => course.slug).join(', '));

  // One registration per course: buy one this buyer is not registered for yet.
  const registered = new Set((await call('registration.list')).map((r) => r.course));
  const course = courses.find((c) => !registered.has(c.slug))?.slug;
  expect(course, 'this buyer is registered for every course already: run again with a new '
    + "buyer's token, TOKEN=$(rpc-server create-token you@example.com | tail -n 1)");

  const purchase = await call('purchase.create', {
    course,
    idempotency_key: `node-client-${randomUUID()}`,
  });
  const purchaseId = purchase.purchase_id;
  console.log('purchase.create:', purchaseId, purchase.course, purchase.state);
  expect(purchase.state === 'pending', 'a new purchase should be pending');

  // Params by position, in the order of the README's method table.
  const got = await call('purchase.get', [purchaseId]);
  console.log('purchase.get:', got.purchase_id, got.state);

  const page = await call('purchase.list', { state: 'pending', limit: 5 });
  console.log('purchase.list (pending):', page.items.map((item) => item.purchase_id).join(', '));
  expect(page.items.some((item) => item.purchase_id === purchaseId), 'new purchase not listed');

  // Claiming "fulfilled" without paying: 402 Payment not verified, nothing written.
  const fulfill = { purchase_id: purchaseId, purchase_state: 'fulfilled' };
  const unpaid = await refused('purchase.fulfill', fulfill, 402);
  expect(unpaid.data?.reason === 'missing', `402 reason ${JSON.stringify(unpaid.data)}`);

  // Pay: the provider charges the amount the shop stores and signs one payment event.
  const paid = await pay(purchaseId);
  const event = JSON.parse(paid.payment_proof.payload);
  console.log('paid:', event.type, event.data.amount, event.data.currency, event.data.payment_ref);
  console.log('webhook:', JSON.stringify(paid.webhook.answer ?? paid.webhook));
  expect(event.type === 'payment.succeeded', `the provider answered ${event.type}`);
  expect(event.data.amount === purchase.amount, `charged ${event.data.amount}`);

  // Fulfil with the proof, twice: the same answer, and nothing happens twice.
  const paidFulfill = { ...fulfill, payment_proof: paid.payment_proof };
  const first = await call('purchase.fulfill', paidFulfill);
  const second = await call('purchase.fulfill', paidFulfill);
  console.log('purchase.fulfill:', first.purchase.state, first.redirect_url);
  expect(first.purchase.state === 'fulfilled', 'the purchase is not fulfilled');
  expect(isDeepStrictEqual(first, second), 'a repeated fulfill answered differently');
  console.log('purchase.fulfill again: identical answer, nothing new happened');

  // The purchase's history: every state change, who made it, on what evidence.
  const events = await call('purchase.events', { purchase_id: purchaseId });
  for (const change of events) {
    console.log(`purchase.events: #${change.seq} ${change.from_state} -> ${change.to_state}`
      + ` by ${change.source} (${change.evidence}) payment_ref=${change.payment_ref}`);
  }
  const changes = events.map((change) => `${change.from_state}->${change.to_state}`);
  expect(isDeepStrictEqual(changes, ['null->pending', 'pending->fulfilled']),
    `the history should be created, then fulfilled once: ${changes}`);
  expect(events.at(-1).payment_ref === event.data.payment_ref, 'fulfilled by another payment');

  const registrations = await call('registration.list');
  console.log('registration.list:', registrations.map((r) => r.course).join(', '));
  expect(registrations.some((r) => r.purchase_id === purchaseId), 'buyer not registered');

  // A batch: one POST, one answer per request (in any order: match them by id); the
  // notification (id null) gets none.
  const batch = [
    client.request('course.list', [], 'courses', false),
    client.request('purchase.get', { purchase_id: purchaseId }, 'get', false),
    client.request('purchase.get', { purchase_id: '0'.repeat(32) }, 'missing', false),
    client.request('course.list', [], null, false),
  ];
  const answers = new Map((await client.request(batch)).map((answer) => [answer.id, answer]));
  for (const [id, answer] of [...answers].sort(([a], [b]) => a.localeCompare(b))) {
    const { error } = answer;
    console.log(`batch ${id}:`, error ? `error ${error.code} ${error.message}` : 'ok');
  }
  expect(answers.size === 3, `batch answered ${answers.size} requests`);
  expect(answers.get('get').result?.state === 'fulfilled', 'batch purchase.get');
  expect(answers.get('missing').error?.code === 404, 'batch purchase.get of a missing id');

  // Two conflicts (409): a fulfilled purchase cannot be canceled, and a buyer who is
  // registered for a course cannot buy it again.
  await refused('purchase.fulfill', [purchaseId, 'canceled'], 409);
  const again = await refused('purchase.create', { course }, 409);
  expect(again.data?.course === course, `buying a course again: ${JSON.stringify(again.data)}`);

  console.log('all calls answered as expected');
}

try {
  await main();
} catch (failure) {
  console.error('failed:', failure.message);
  process.exitCode = 1;
}
