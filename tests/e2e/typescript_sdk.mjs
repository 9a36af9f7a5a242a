// The official TypeScript SDK (@anthropic-ai/sdk) against a running gateway: one scenario group per run.
//
//   node typescript_sdk.mjs GROUP '{"gateway": URL, "key": K, "mock": URL, "mock_keys": [...], "model": M, ...}'
//
// Prints one JSON object: what the SDK returned or threw, for tests/e2e/test_typescript_sdk.py to judge.
// The script asserts nothing itself, so that a failing test shows the whole of what the SDK saw.
import Anthropic from '@anthropic-ai/sdk';

const [group, rawSetup] = process.argv.slice(2);
const setup = JSON.parse(rawSetup);
const MODEL = setup.model;
const USER = [{ role: 'user', content: 'Say hi' }];

function client(options = {}) {
  return new Anthropic({ baseURL: setup.gateway, apiKey: setup.key, maxRetries: 0, ...options });
}

function describeError(error) {
  return {
    class: error.constructor.name,
    isAPIError: error instanceof Anthropic.APIError,
    status: error.status ?? null,
    requestID: error.requestID ?? null,
    type: error.type ?? error.error?.error?.type ?? null,
    bodyRequestID: error.error?.request_id ?? null,
    message: error.message,
  };
}

async function outcome(promise) {
  try {
    await promise;
    return { class: null };
  } catch (error) {
    return describeError(error);
  }
}

async function mockAdmin(method, path, body) {
  const init = { method, headers: { 'content-type': 'application/json' } };
  if (body !== undefined) init.body = JSON.stringify(body);
  const response = await fetch(`${setup.mock}${path}`, init);
  if (!response.ok) throw new Error(`mock ${method} ${path}: ${response.status} ${await response.text()}`);
}

async function faultEveryKey(fault) {
  await mockAdmin('DELETE', '/_mock/faults');
  for (const key of setup.mock_keys) await mockAdmin('POST', `/_mock/faults/${key}`, fault);
}

// The SDK's retry wait is a setTimeout in its `sleep` helper: the delay it chose (not the time it took) goes
// to the events of the latest recorder.
let retrySleeps = null;
const setTimeoutOriginal = globalThis.setTimeout;
globalThis.setTimeout = (callback, ms, ...args) => {
  if (retrySleeps && /\bsleep\b/.test(new Error().stack ?? '')) retrySleeps.push({ event: 'sleep', ms });
  return setTimeoutOriginal(callback, ms, ...args);
};

// Every request the SDK sends and every answer it gets, with the retry sleeps it takes between them, in order.
function recorder() {
  const events = [];
  retrySleeps = events;
  const fetchRecorded = async (url, init) => {
    events.push({ event: 'request', retryCount: new Headers(init?.headers).get('x-stainless-retry-count') });
    const response = await fetch(url, init);
    const header = (name) => response.headers.get(name);
    events.push({
      event: 'response',
      status: response.status,
      requestID: header('request-id'),
      retryAfter: header('retry-after'),
      retryAfterMs: header('retry-after-ms'),
      shouldRetry: header('x-should-retry'),
    });
    return response;
  };
  return { events, fetch: fetchRecorded };
}

async function answers() {
  const result = {};
  const gateway = client();
  const message = await gateway.messages.create({ model: MODEL, max_tokens: 64, messages: USER });
  result.create = { message, requestID: message._request_id };

  const { data, response } = await gateway.messages
    .create({ model: MODEL, max_tokens: 64, messages: USER })
    .withResponse();
  result.withResponse = { id: data.id, headers: Object.fromEntries(response.headers) };
  const raw = await gateway.messages.create({ model: MODEL, max_tokens: 64, messages: USER }).asResponse();
  result.asResponse = { status: raw.status, headers: Object.fromEntries(raw.headers), body: await raw.json() };

  const stream = gateway.messages.stream({ model: MODEL, max_tokens: 64, messages: USER });
  const helperEvents = { connect: 0, streamEvent: 0, text: '', message: 0, end: 0 };
  stream.on('connect', () => helperEvents.connect++);
  stream.on('streamEvent', () => helperEvents.streamEvent++);
  stream.on('text', (delta) => (helperEvents.text += delta));
  stream.on('message', () => helperEvents.message++);
  stream.on('end', () => helperEvents.end++);
  const finalMessage = await stream.finalMessage();
  result.stream = { helperEvents, finalMessage, finalText: await stream.finalText(), requestID: stream.request_id };

  const events = await gateway.messages.create({ model: MODEL, max_tokens: 64, messages: USER, stream: true });
  const types = [];
  let text = '';
  let finalUsage = null;
  for await (const event of events) {
    types.push(event.type);
    if (event.type === 'content_block_delta' && event.delta.type === 'text_delta') text += event.delta.text;
    if (event.type === 'message_delta') finalUsage = event.usage;
  }
  result.rawStream = { types, text, finalUsage };

  result.countTokens = await gateway.messages.countTokens({ model: MODEL, messages: USER });

  // A page of two makes the SDK follow `has_more` / `last_id` through the whole list.
  const listed = [];
  for await (const model of gateway.models.list({ limit: 2 })) listed.push(model.id);
  const firstPage = await gateway.models.list({ limit: 2 });
  result.models = {
    listed,
    firstPage: firstPage.data.map((model) => model.id),
    firstPageHasMore: firstPage.has_more,
    retrieved: await gateway.models.retrieve(MODEL),
  };

  // `ANTHROPIC_BASE_URL` as users export it, with and without a trailing slash (read when a client is made).
  result.baseURLs = {};
  for (const baseURL of [setup.gateway, `${setup.gateway}/`]) {
    process.env.ANTHROPIC_BASE_URL = baseURL;
    process.env.ANTHROPIC_API_KEY = setup.key;
    const fromEnvironment = new Anthropic({ maxRetries: 0 });
    const { data: answer, response: answered } = await fromEnvironment.messages
      .create({ model: MODEL, max_tokens: 16, messages: USER })
      .withResponse();
    result.baseURLs[baseURL] = { url: answered.url, type: answer.type };
  }

  // The SDK as a browser app uses it (its flag, and the Origin a browser adds): answers it may read.
  const browser = client({ dangerouslyAllowBrowser: true, defaultHeaders: { origin: 'http://localhost:5173' } });
  const browserAnswer = await browser.messages.create({ model: MODEL, max_tokens: 16, messages: USER }).asResponse();
  result.browser = { status: browserAnswer.status, headers: Object.fromEntries(browserAnswer.headers) };

  // Last, so that the mock's last request is this one (the test reads its headers).
  result.beta = await gateway.beta.messages.create({
    model: MODEL,
    max_tokens: 16,
    messages: USER,
    betas: ['interleaved-thinking-2025-05-14', 'context-management-2025-06-27'],
  });
  return result;
}

async function errors() {
  const result = {};
  const gateway = client();
  const limited = client({ apiKey: setup.limited_key });
  result.denied = await outcome(limited.messages.create({ model: MODEL, max_tokens: 16, messages: USER }));

  // maxRetries 2: poolgate's `x-should-retry: false` must stop the SDK's retries of a wrong key.
  const wrongKey = recorder();
  const wrong = client({ apiKey: 'pg-mistyped-0123456789', maxRetries: 2, fetch: wrongKey.fetch });
  result.wrongKey = await outcome(wrong.messages.create({ model: MODEL, max_tokens: 16, messages: USER }));
  result.wrongKeyEvents = wrongKey.events;

  result.malformed = await outcome(gateway.messages.create({ model: MODEL, max_tokens: 'many', messages: USER }));
  result.unknownModel = await outcome(
    gateway.messages.create({ model: 'claude-nonexistent-9', max_tokens: 16, messages: USER }),
  );
  result.v1BaseURL = await outcome(
    client({ baseURL: `${setup.gateway}/v1` }).messages.create({ model: MODEL, max_tokens: 16, messages: USER }),
  );
  // The connection a refused request used serves the next one (the SDK's fetch keeps it alive).
  result.afterErrors = (await gateway.messages.create({ model: MODEL, max_tokens: 16, messages: USER })).type;

  // An error event after the stream began: raw iteration and the stream helper each throw the SDK's APIError.
  await faultEveryKey({ midstream_error_after: 3, times: 1 });
  const types = [];
  result.midstreamRaw = await outcome(
    (async () => {
      const events = await gateway.messages.create({ model: MODEL, max_tokens: 64, messages: USER, stream: true });
      for await (const event of events) types.push(event.type);
    })(),
  );
  result.midstreamRawTypes = types;
  await faultEveryKey({ midstream_error_after: 3, times: 1 });
  const helper = gateway.messages.stream({ model: MODEL, max_tokens: 64, messages: USER });
  let errorEvent = null;
  helper.on('error', (error) => (errorEvent = describeError(error)));
  result.midstreamHelper = await outcome(helper.finalMessage());
  result.midstreamHelperErrorEvent = errorEvent;
  await mockAdmin('DELETE', '/_mock/faults');
  return result;
}

async function cancels() {
  // A slow answer (4 tokens/s) is still streaming when each client gives up after its first text.
  await faultEveryKey({ tokens_per_second: 4 });
  const result = {};
  const gateway = client();
  const stream = gateway.messages.stream({ model: MODEL, max_tokens: 64, messages: USER });
  stream.on('text', () => stream.abort());
  result.streamAbort = await outcome(stream.finalMessage());
  result.streamAborted = stream.aborted;

  const controller = new AbortController();
  const seen = [];
  result.signalAbort = await outcome(
    (async () => {
      const events = await gateway.messages.create(
        { model: MODEL, max_tokens: 64, messages: USER, stream: true },
        { signal: controller.signal },
      );
      for await (const event of events) {
        seen.push(event.type);
        if (event.type === 'content_block_delta') controller.abort();
      }
    })(),
  );
  result.signalAbortSeen = seen;
  await mockAdmin('DELETE', '/_mock/faults');
  return result;
}

async function retries() {
  const result = {};
  // Every account answers one 529 (retry-after 1 s): poolgate tries each, then answers 529 itself; the SDK's
  // retry, once the accounts are back, is answered.
  await faultEveryKey({ status: 529, retry_after: 1, times: 1 });
  const recovered = recorder();
  const once = client({ maxRetries: 1, fetch: recovered.fetch });
  result.recovered = await outcome(once.messages.create({ model: MODEL, max_tokens: 16, messages: USER }));
  result.recoveredEvents = recovered.events;

  // Every account keeps answering 529: the SDK gives up after its retries with an OverloadedError.
  await faultEveryKey({ status: 529, retry_after: 1 });
  const exhausted = recorder();
  const never = client({ maxRetries: 1, fetch: exhausted.fetch });
  result.exhausted = await outcome(never.messages.create({ model: MODEL, max_tokens: 16, messages: USER }));
  result.exhaustedEvents = exhausted.events;
  await mockAdmin('DELETE', '/_mock/faults');
  return result;
}

const groups = { answers, errors, cancels, retries };
if (!(group in groups)) throw new Error(`unknown group ${group}: one of ${Object.keys(groups).join(', ')}`);
process.stdout.write(JSON.stringify(await groups[group]()));
