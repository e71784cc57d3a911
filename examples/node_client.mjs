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
// gave it, and reads the purchase's history (purchase.events). Meanwhile it follows the
// purchase live: over a WebSocket to the same endpoint (the `ws` package; Node 20 has no
// global WebSocket), with the token in the upgrade's Authorization header, it subscribes
// (purchase.subscribe) and waits for the purchase.updated notification saying the purchase
// is fulfilled, giving up after LIVE_TIMEOUT seconds (default 10) with a non-zero exit.
//
// Start the server with demo data and the example payment provider first (see the
// README), then:
//   npm ci --prefix examples        # installs jayson and ws into examples/node_modules
//   node examples/node_client.mjs
// Settings: RPC_URL (default http://127.0.0.1:8080/rpc), TOKEN (default demo-alice; a buyer
// not yet registered for every course), PROVIDER_URL (default http://127.0.0.1:8090),
// LIVE_TIMEOUT (seconds to wait for the live notification, default 10).
// Exits non-zero if any answer is not the one it expects.

import { randomUUID } from 'node:crypto';
import { isDeepStrictEqual } from 'node:util';
// jayson is CommonJS without an exports map: ES modules name the file itself.
import jayson from 'jayson/promise/index.js';
import WebSocket from 'ws';

const RPC_URL = new URL(process.env.RPC_URL || 'http://127.0.0.1:8080/rpc');
const TOKEN = process.env.TOKEN || 'demo-alice';
const PROVIDER_URL = process.env.PROVIDER_URL || 'http://127.0.0.1:8090';
const LIVE_TIMEOUT_MS = 1000 * Number(process.env.LIVE_TIMEOUT || 10);

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

// LiveConnection: JSON-RPC 2.0 over one WebSocket to the same endpoint (ws:// for http://).
// Each text frame is a request, an answer or a notification; several calls may be in
// flight and their answers come in any order, so they are matched by id.
class LiveConnection {
  static open(rpcUrl, token) {
    const url = new URL(rpcUrl);
    url.protocol = url.protocol === 'https:' ? 'wss:' : 'ws:';
    return new Promise((resolve, reject) => {
      // Unlike a browser, Node can send the bearer token on the upgrade request itself.
      const socket = new WebSocket(url, { headers: { Authorization: `Bearer ${token}` } });
      socket.once('open', () => resolve(new LiveConnection(socket)));
      socket.once('error', (error) => reject(new Error(`WebSocket ${url}: ${error.message}`)));
    });
  }

  constructor(socket) {
    this.socket = socket;
    this.nextId = 1;
    this.calls = new Map(); // id -> {resolve, reject, method}
    this.waiters = new Set(); // {method, accept, resolve, reject}
    // Notifications nobody waited for yet: one may arrive in the same read as the answer to
    // purchase.subscribe, before the code awaiting that answer has asked for it.
    this.unclaimed = [];
    this.closed = null;
    socket.on('message', (data, isBinary) => {
      if (!isBinary) this.receive(JSON.parse(data.toString('utf8')));
    });
    socket.on('close', (code, reason) => {
      this.closed = `the socket closed: ${code} ${reason.toString()}`;
      for (const { reject } of [...this.calls.values(), ...this.waiters]) {
        reject(new Error(this.closed));
      }
      this.calls.clear();
      this.waiters.clear();
    });
  }

  receive(frame) {
    for (const message of Array.isArray(frame) ? frame : [frame]) {
      if (message.method) {
        const waiter = [...this.waiters].find((w) => w.method === message.method);
        if (waiter && waiter.accept(message.params)) {
          this.waiters.delete(waiter);
          waiter.resolve(message.params);
        } else if (!waiter) {
          this.unclaimed.push(message);
        }
        continue;
      }
      const pending = this.calls.get(message.id);
      if (!pending) continue;
      this.calls.delete(message.id);
      if (message.error) pending.reject(new RpcError(pending.method, message.error));
      else pending.resolve(message.result);
    }
  }

  call(method, params) {
    if (this.closed) return Promise.reject(new Error(this.closed));
    const id = this.nextId++;
    return new Promise((resolve, reject) => {
      this.calls.set(id, { resolve, reject, method });
      this.socket.send(JSON.stringify({ jsonrpc: '2.0', method, params, id }));
    });
  }

  // notification: resolves to the params of the first `method` notification that `accept`
  // takes (checked on each one, unclaimed ones first, in the order they came); rejects
  // after `timeoutMs` or on close. One waiter per method at a time.
  notification(method, accept, timeoutMs, waitingFor) {
    while (this.unclaimed.length) {
      const message = this.unclaimed.shift();
      if (message.method === method && accept(message.params)) {
        return Promise.resolve(message.params);
      }
    }
    if (this.closed) return Promise.reject(new Error(this.closed));
    return new Promise((resolve, reject) => {
      const timer = setTimeout(() => {
        this.waiters.delete(waiter);
        reject(new Error(`no ${method} notification ${waitingFor} within ${timeoutMs / 1000} s`));
      }, timeoutMs);
      const done = (settle) => (value) => { clearTimeout(timer); settle(value); };
      const waiter = { method, accept, resolve: done(resolve), reject: done(reject) };
      this.waiters.add(waiter);
    });
  }

  close() {
    this.socket.close(1000, 'done');
  }
}

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

// whileSubscribed: follow the purchase live from `since` over a WebSocket, run `act`, and
// resolve to the purchase.updated notification (its result) saying the purchase is
// fulfilled. Whoever fulfils it (the provider's webhook or the proof `act` hands on), the
// notification comes, replayed or live, exactly once; none within LIVE_TIMEOUT: rejects.
async function whileSubscribed(purchaseId, since, act) {
  const live = await LiveConnection.open(RPC_URL, TOKEN);
  try {
    const subscription = await live.call('purchase.subscribe', { purchase_id: purchaseId, since });
    console.log(`live: subscribed to ${purchaseId} since #${since}`);
    const fulfilled = live.notification(
      'purchase.updated',
      ({ subscription: id, result }) => {
        if (id !== subscription) return false;
        const { event } = result;
        console.log(`live: purchase.updated #${result.seq} ${event.from_state} -> ${event.to_state}`
          + ` by ${event.source} (${event.evidence}), purchase now ${result.purchase.state}`);
        return result.purchase.state === 'fulfilled';
      },
      LIVE_TIMEOUT_MS,
      `saying ${purchaseId} is fulfilled`,
    );
    // Handled now, awaited below: a rejection while `act` runs is not "unhandled".
    fulfilled.catch(() => {});
    await act();
    // Pushed, not polled: the server says so on its own once the change has committed.
    const { result } = await fulfilled;
    expect(await live.call('purchase.unsubscribe', { subscription }) === true, 'unsubscribe');
    return result;
  } finally {
    live.close(); // also ends the subscription, and lets Node exit after a failure
  }
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

  // The seq of the purchase's latest event: subscribing from it (`since`) replays anything
  // that happens after this point, so the payment cannot slip in before the subscription.
  const since = (await call('purchase.events', { purchase_id: purchaseId })).at(-1).seq;

  // Pay: the provider charges the amount the shop stores and signs one payment event.
  const paid = await pay(purchaseId);
  const event = JSON.parse(paid.payment_proof.payload);
  console.log('paid:', event.type, event.data.amount, event.data.currency, event.data.payment_ref);
  console.log('webhook:', JSON.stringify(paid.webhook.answer ?? paid.webhook));
  expect(event.type === 'payment.succeeded', `the provider answered ${event.type}`);
  expect(event.data.amount === purchase.amount, `charged ${event.data.amount}`);

  // Fulfil with the proof, twice (the same answer, nothing happens twice), subscribed to
  // the purchase meanwhile.
  const paidFulfill = { ...fulfill, payment_proof: paid.payment_proof };
  const pushed = await whileSubscribed(purchaseId, since, async () => {
    const first = await call('purchase.fulfill', paidFulfill);
    const second = await call('purchase.fulfill', paidFulfill);
    console.log('purchase.fulfill:', first.purchase.state, first.redirect_url);
    expect(first.purchase.state === 'fulfilled', 'the purchase is not fulfilled');
    expect(isDeepStrictEqual(first, second), 'a repeated fulfill answered differently');
    console.log('purchase.fulfill again: identical answer, nothing new happened');
  });
  expect(pushed.event.payment_ref === event.data.payment_ref, 'fulfilled by another payment');
  console.log(`live: fulfilled, pushed as #${pushed.seq}`);

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
