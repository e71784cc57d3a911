// Calling the purchase service from Node.js with jayson, an npm JSON-RPC 2.0 client.
//
// jayson's promise client sends one call with `client.request(method, params)` and a
// batch with `client.request([...])`, where each item is built (not sent) by
// `client.request(method, params, id, false)`. The bearer token goes in the HTTP headers.
// Every call resolves to the whole response object: `{result}` or `{error}`.
//
// Start the server with demo data first (see the README), then:
//   npm ci --prefix examples        # installs jayson into examples/node_modules
//   node examples/node_client.mjs
// Settings: RPC_URL (default http://127.0.0.1:8080/rpc), TOKEN (default demo-alice).
// Exits non-zero if any answer is not the one it expects.

import { randomUUID } from 'node:crypto';
import { isDeepStrictEqual } from 'node:util';
// jayson is CommonJS without an exports map: ES modules name the file itself.
import jayson from 'jayson/promise/index.js';

const RPC_URL = new URL(process.env.RPC_URL || 'http://127.0.0.1:8080/rpc');
const TOKEN = process.env.TOKEN || 'demo-alice';

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

async function main() {
  const courses = await call('course.list');
  console.log('course.list:', courses.map((course) => course.slug).join(', '));

  const purchase = await call('purchase.create', {
    course: courses[0].slug,
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

  const fulfill = { purchase_id: purchaseId, purchase_state: 'fulfilled' };
  const first = await call('purchase.fulfill', fulfill);
  const second = await call('purchase.fulfill', fulfill);
  console.log('purchase.fulfill:', first.purchase.state, first.redirect_url);
  expect(isDeepStrictEqual(first, second), 'a repeated fulfill answered differently');
  console.log('purchase.fulfill again: identical answer, nothing new happened');

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

  // An error case: a fulfilled purchase cannot be canceled (409 Conflict).
  const conflict = await client.request('purchase.fulfill', [purchaseId, 'canceled']);
  expect(conflict.error, 'canceling a fulfilled purchase succeeded');
  const { code, message, data } = conflict.error;
  console.log(`error: code=${code} message=${message} data=${JSON.stringify(data)}`);
  expect(code === 409, `expected 409, got ${code}`);

  console.log('all calls answered as expected');
}

try {
  await main();
} catch (failure) {
  console.error('failed:', failure.message);
  process.exitCode = 1;
}
