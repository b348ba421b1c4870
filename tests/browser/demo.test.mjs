// The demo page (www/) and the JS package (pkg/index.js) in Debian's headless Chromium:
// streamed ids equal the native CLI's, abort then caption again, monotone progress, the Cache
// API, visible errors, every image input type, dispose. Run by `./build.sh test` after pkg/ is built.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, statSync } from 'node:fs';
import { join } from 'node:path';
import { startServer } from '../../www/serve.mjs';
import { launch, watchPage, printLog, referenceIds, root, artifacts } from './helpers.mjs';

const MODEL = 'tests/fixtures/tiny-ved-v5';
const MODEL_FILES = ['config.json', 'model.safetensors', 'tokenizer.json', 'preprocessor_config.json', 'generation_config.json'];
const requests = [];
let server, browser, page, base, ref;
const log = [];

// A model folder whose weights are cut short, served at /corrupt-model/; one behind a
// single-page-app fallback (missing files answer 200 text/html, as Vite's dev server does) at /spa-model/.
async function onRequest(req, res, headers) {
  requests.push(req.url);
  const spa = req.url.match(/^\/spa-model\/(.+)$/);
  if (spa) {
    const html = !MODEL_FILES.includes(spa[1]) || spa[1] === 'generation_config.json';
    const body = html ? Buffer.from('<!doctype html><title>app</title>') : readFileSync(join(root, MODEL, spa[1]));
    res.writeHead(200, { ...headers, 'Content-Type': html ? 'text/html' : 'application/octet-stream', 'Content-Length': body.length });
    res.end(body);
    return true;
  }
  const m = req.url.match(/^\/(corrupt|bad-header)-model\/([\w.]+)$/);
  if (!m) return false;
  let body = readFileSync(join(root, MODEL, m[2]));
  // Cut short (found once the file has ended), or a header that is not JSON before 8 MiB more
  // (refused as it streams in: the download stops).
  if (m[2] === 'model.safetensors' && m[1] === 'corrupt') body = body.subarray(0, 1000);
  if (m[2] === 'model.safetensors' && m[1] === 'bad-header') {
    body = Buffer.concat([Buffer.from([16, 0, 0, 0, 0, 0, 0, 0]), Buffer.from('this is not json'), Buffer.alloc(8 << 20)]);
  }
  res.writeHead(200, { ...headers, 'Content-Length': body.length });
  res.end(body);
  return true;
}

const state = () => page.evaluate(() => document.body.dataset.state);
const waitState = (states, timeout = 60_000) =>
  page.waitForFunction((s) => s.includes(document.body.dataset.state), states, { timeout });
const text = (sel) => page.locator(sel).textContent();
const weightRequests = () => requests.filter((u) => u.endsWith('/model.safetensors')).length;

async function captionSampleInDemo() {
  await page.click('.sample >> nth=0');
  await waitState(['done', 'error']);
  assert.equal(await state(), 'done', await text('#error'));
  return {
    streamed: JSON.parse(await page.locator('#caption').getAttribute('data-token-ids')),
    result: JSON.parse(await page.locator('#caption').getAttribute('data-result-ids')),
  };
}

before(async () => {
  ref = referenceIds();
  server = await startServer(0, { onRequest });
  base = `http://127.0.0.1:${server.address().port}`;
  browser = await launch();
  page = await browser.context.newPage();
  watchPage(page, log);
  // The random fixture as the default model: its long captions exercise streaming and stopping.
  await page.goto(`${base}/www/?model=../${MODEL}/`);
  await waitState(['ready', 'error']);
  assert.equal(await state(), 'ready', await text('#error'));
});

after(async () => {
  printLog(log);
  await browser?.close();
  server?.close();
});

test('the reference: native CLI ids equal the fixture (🤗 transformers)', () => {
  assert.equal(ref.native.length, 20);
  assert.deepEqual(ref.native, ref.fixture);
});

test('demo: captioning the sample streams the native CLI ids', async () => {
  assert.equal(await page.evaluate(() => self.crossOriginIsolated), true);
  const { streamed, result } = await captionSampleInDemo();
  assert.deepEqual(streamed, ref.native);
  assert.deepEqual(result, ref.native);
  assert.equal((await text('#caption')).trim(), ref.text.trim());
  assert.match(await text('#timings'), /encoder \d+ ms · first token \d+ ms · [\d.]+ tokens\/s · 20 tokens/);
  // The WASM runs in the worker: the page itself never fetched it (resource timing is per realm).
  assert.deepEqual(await page.evaluate(() => performance.getEntriesByType('resource').map((e) => e.name).filter((n) => n.endsWith('.wasm'))), []);
  await page.screenshot({ path: join(artifacts, 'demo.png'), fullPage: true });
});

test('demo: the device switch loads the model again on WebGPU, encoder and decoder (SwiftShader here): the same ids, timings per device side by side', async () => {
  await page.selectOption('#device', 'webgpu');
  await waitState(['ready', 'error']);
  assert.equal(await state(), 'ready', await text('#error'));
  assert.match(await text('#status'), /runs on WebGPU \(.+\)/);
  const { streamed } = await captionSampleInDemo();
  assert.deepEqual(streamed, ref.native);
  assert.match(await text('#device-timings'), /wasm: encoder \d+ ms .* \| webgpu: encoder \d+ ms/);
  await page.selectOption('#device', 'wasm');
  await waitState(['ready', 'error']);
  assert.equal(await state(), 'ready', await text('#error'));
  assert.match(await text('#status'), /runs on WASM/);
});

test('API: abort mid-caption, then the same captioner captions again', async () => {
  const r = await page.evaluate(async (url) => {
    const c = wasmcapDemo.captioner;
    const controller = new AbortController();
    const seen = [];
    let error = null;
    const run = c.caption(url, { maxNewTokens: 40, signal: controller.signal });
    try {
      for await (const t of run) {
        seen.push(t.id);
        if (seen.length === 3) controller.abort();
      }
    } catch (e) {
      error = e.name;
    }
    const resultError = await run.result.then(() => null, (e) => e.name);
    // run.abort() and leaving a for-await loop early stop a caption too.
    const second = c.caption(url);
    second.abort();
    const secondError = await second.result.then(() => null, (e) => e.name);
    for await (const t of c.caption(url)) break; // eslint-disable-line no-unused-vars
    const again = c.caption(url, { maxNewTokens: 20 });
    const ids = [];
    for await (const t of again) ids.push(t.id);
    return { seen, error, resultError, secondError, ids, result: (await again.result).tokenIds };
  }, `${base}/tests/fixtures/images/astronaut.png`);
  assert.equal(r.error, 'AbortError');
  assert.equal(r.resultError, 'AbortError');
  assert.equal(r.secondError, 'AbortError');
  assert.deepEqual(r.seen, ref.native.slice(0, 3));
  assert.deepEqual(r.ids, ref.native);
  assert.deepEqual(r.result, ref.native);
});

test('demo: the stop button, then caption again', async () => {
  await page.fill('#max-tokens', '40');
  await page.click('.sample >> nth=0');
  await page.click('#stop', { timeout: 5_000 }).catch(() => {}); // the tiny model may finish first
  await waitState(['aborted', 'done']);
  await page.fill('#max-tokens', '20');
  const { streamed } = await captionSampleInDemo();
  assert.deepEqual(streamed, ref.native);
});

test('every image input type captions (Blob, URL, ImageData, <img>, <canvas>, OffscreenCanvas, ImageBitmap)', async () => {
  const r = await page.evaluate(async (url) => {
    const c = wasmcapDemo.captioner;
    const blob = await (await fetch(url)).blob();
    const img = new Image();
    img.src = url;
    await img.decode();
    const bitmap = await createImageBitmap(blob, { colorSpaceConversion: 'none' });
    const canvas = document.createElement('canvas');
    canvas.width = bitmap.width;
    canvas.height = bitmap.height;
    canvas.getContext('2d').drawImage(bitmap, 0, 0);
    const imageData = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height);
    const offscreen = new OffscreenCanvas(bitmap.width, bitmap.height);
    offscreen.getContext('2d').drawImage(bitmap, 0, 0);
    const inputs = { url, blob, file: new File([blob], 'a.png', { type: 'image/png' }), imageData, img, canvas, offscreen, bitmap };
    const out = {};
    for (const [name, input] of Object.entries(inputs)) {
      const run = c.caption(input, { maxNewTokens: 20 });
      const ids = [];
      for await (const t of run) ids.push(t.id);
      out[name] = { ids, result: (await run.result).tokenIds };
    }
    out.bitmapStillUsable = bitmap.width > 0;
    return out;
  }, `${base}/tests/fixtures/images/astronaut.png`);
  assert.equal(r.bitmapStillUsable, true);
  delete r.bitmapStillUsable;
  // astronaut.png has no colour profile: the browser's decode is Rust's decode, pixel for pixel.
  for (const [name, { ids, result }] of Object.entries(r)) {
    assert.deepEqual(ids, result, name);
    assert.deepEqual(ids, ref.native, name);
  }
});

test('API: a Rust error rejects with its message; the captioner keeps working', async () => {
  const r = await page.evaluate(async (url) => {
    const c = wasmcapDemo.captioner;
    const bad = c.caption(new Blob([new Uint8Array([0x89, 0x50, 0x4e, 0x47, 1, 2, 3])], { type: 'image/png' }));
    const iterError = await (async () => { try { for await (const _ of bad); return null; } catch (e) { return e.message; } })();
    const resultError = await bad.result.then(() => null, (e) => e.message);
    const ok = await c.caption(url, { maxNewTokens: 20 }).result;
    return { iterError, resultError, ids: ok.tokenIds, timings: ok.timings };
  }, `${base}/tests/fixtures/images/astronaut.png`);
  assert.ok(r.iterError && r.iterError === r.resultError, JSON.stringify(r));
  assert.match(r.iterError, /image|decode|png/i);
  assert.deepEqual(r.ids, ref.native);
  for (const k of ['encoderMs', 'firstTokenMs', 'tokensPerS']) assert.equal(typeof r.timings[k], 'number', k);
});

test('progress: first load from the network, monotone to 100 %', async () => {
  await page.evaluate(() => wasmcapDemo.Captioner.clearCache());
  const before = weightRequests();
  await page.reload();
  await waitState(['ready', 'error']);
  assert.equal(await state(), 'ready', await text('#error'));
  assert.equal(weightRequests(), before + 1, 'model.safetensors fetched once');
  const events = await page.evaluate(() => wasmcapDemo.progress);
  const sizes = Object.fromEntries(MODEL_FILES.map((f) => [f, statSync(join(root, MODEL, f)).size]));
  const total = Object.values(sizes).reduce((a, b) => a + b, 0);
  assert.ok(events.length >= MODEL_FILES.length + 1);
  for (let i = 1; i < events.length; i++) {
    assert.ok(events[i].fraction >= events[i - 1].fraction, `fraction went down at event ${i}`);
    assert.ok(events[i].loaded >= events[i - 1].loaded, `loaded went down at event ${i}`);
  }
  for (const e of events) assert.ok(e.loaded <= e.total && e.fraction <= 1);
  const last = events.at(-1);
  assert.equal(last.done, true);
  assert.equal(last.fraction, 1);
  assert.equal(last.loaded, total);
  assert.equal(last.total, total);
  for (const f of MODEL_FILES) {
    const mine = events.filter((e) => e.file === f);
    assert.ok(mine.length >= 2, f);
    for (let i = 1; i < mine.length; i++) assert.ok(mine[i].fileLoaded >= mine[i - 1].fileLoaded, f);
    assert.equal(mine.at(-1).fileDone, true, f);
    assert.equal(mine.at(-1).fileLoaded, sizes[f], f);
    assert.equal(mine.at(-1).fileTotal, sizes[f], f);
    assert.ok(mine.every((e) => !e.cached), f);
  }
  assert.equal(await page.locator('#progress').evaluate((p) => p.value), 1);
});

test('cache: a second load reads the Cache API, no model file on the wire', async () => {
  const before = requests.length;
  await page.reload();
  await waitState(['ready', 'error']);
  assert.equal(await state(), 'ready', await text('#error'));
  const fetched = requests.slice(before).filter((u) => u.startsWith(`/${MODEL}/`));
  assert.deepEqual(fetched, [], 'no request for the model folder (generation_config.json included)');
  const events = await page.evaluate(() => wasmcapDemo.progress);
  assert.ok(events.filter((e) => e.file).every((e) => e.cached));
  assert.equal(events.at(-1).fraction, 1);
  assert.match(await text('#status'), /from the cache/);
  const { streamed } = await captionSampleInDemo();
  assert.deepEqual(streamed, ref.native);
});

test('demo: a bad URL and a corrupt model show an error; the page still works', async () => {
  await page.check('input[name=model][value=url]');
  await page.fill('#model-url', `${base}/no-such-model/`);
  await page.click('#load');
  await waitState(['error', 'ready']);
  assert.equal(await state(), 'error');
  assert.ok(await page.locator('#error').isVisible());
  assert.match(await text('#error'), /config\.json.*404|404.*config\.json/s);
  // The model loaded before is still there.
  assert.deepEqual((await captionSampleInDemo()).streamed, ref.native);

  await page.fill('#model-url', `${base}/corrupt-model/`);
  await page.click('#load');
  await waitState(['error', 'ready']);
  assert.equal(await state(), 'error');
  assert.ok(await page.locator('#error').isVisible());
  const message = await text('#error');
  assert.match(message, /safetensors/i, message);
  const cached = () => page.evaluate(async () =>
    (await (await caches.open('wasmcap-models-v1')).keys()).map((r) => r.url).filter((u) => /\/(corrupt|bad-header)-model\//.test(u)));
  assert.deepEqual(await cached(), [], 'files of a model that failed to load are not kept in the cache');
  await page.fill('#model-url', `${base}/bad-header-model/`);
  await page.click('#load');
  await waitState(['error', 'ready']);
  assert.equal(await state(), 'error');
  const refused = await text('#error');
  assert.match(refused, /model\.safetensors.*header/is, refused);
  assert.deepEqual(await cached(), [], 'nor those of one refused mid-stream');
  await page.screenshot({ path: join(artifacts, 'demo-error.png'), fullPage: true });

  // A file that is not an image.
  await page.setInputFiles('#file', { name: 'broken.png', mimeType: 'image/png', buffer: Buffer.from('not a png at all') });
  await waitState(['error', 'done']);
  assert.equal(await state(), 'error');
  assert.ok((await text('#error')).length > 0);

  // The model folder's files picked from disk (a map of Files).
  await page.setInputFiles('#model-files', MODEL_FILES.map((f) => join(root, MODEL, f)));
  await waitState(['ready', 'error']);
  assert.equal(await state(), 'ready', await text('#error'));
  assert.match(await text('#status'), /5 local files/);
  assert.deepEqual((await captionSampleInDemo()).streamed, ref.native);

  await page.check('input[name=model][value=default]');
  await page.click('#load');
  await waitState(['ready', 'error']);
  assert.equal(await state(), 'ready', await text('#error'));
  assert.equal(await text('#error'), '');
  assert.deepEqual((await captionSampleInDemo()).streamed, ref.native);
});

test('API: a map of Files, cache off, dispose', async () => {
  const r = await page.evaluate(async ([base, files, img]) => {
    const { Captioner } = wasmcapDemo;
    const map = {};
    for (const f of files) map[f] = new File([await (await fetch(`${base}${f}`)).blob()], f);
    const events = [];
    const c = await Captioner.fromPretrained(map, { onProgress: (e) => events.push(e), cache: false });
    const ids = (await c.caption(img, { maxNewTokens: 20 }).result).tokenIds;
    c.dispose();
    const afterDispose = await c.caption(img).result.then(() => null, (e) => e.message);
    const missing = await Captioner.fromPretrained({ 'config.json': map['config.json'] }).then(() => null, (e) => e.message);
    return { ids, last: events.at(-1), afterDispose, missing };
  }, [`${base}/${MODEL}/`, MODEL_FILES, `${base}/tests/fixtures/images/astronaut.png`]);
  assert.deepEqual(r.ids, ref.native);
  assert.equal(r.last.fraction, 1);
  assert.match(r.afterDispose, /disposed/);
  assert.match(r.missing, /model\.safetensors/);
});

test('API: a server answering missing files with an HTML page (SPA fallback)', async () => {
  const r = await page.evaluate(async ([base, img]) => {
    const { Captioner } = wasmcapDemo;
    // generation_config.json is optional: the HTML answer counts as missing.
    const c = await Captioner.fromPretrained(`${base}/spa-model/`, { cache: false });
    const ids = (await c.caption(img, { maxNewTokens: 20 }).result).tokenIds;
    c.dispose();
    const bad = await Captioner.fromPretrained(`${base}/spa-model/nested/`, { cache: false }).then(() => null, (e) => e.message);
    return { ids, bad };
  }, [base, `${base}/tests/fixtures/images/astronaut.png`]);
  assert.deepEqual(r.ids, ref.native);
  assert.match(r.bad ?? '', /config\.json: .*answered with an HTML page/);
});

test('demo: the embedded models (no ?model=) caption the shapes samples with transformers\' tokens', async () => {
  const fresh = await browser.context.newPage();
  watchPage(fresh, log);
  try {
    await fresh.goto(`${base}/www/`);
    await fresh.waitForFunction(() => ['ready', 'error'].includes(document.body.dataset.state), null, { timeout: 60_000 });
    assert.equal(await fresh.evaluate(() => document.body.dataset.state), 'ready', await fresh.locator('#error').textContent());
    assert.match(await fresh.locator('#default-model').textContent(), /models\/shapes-cross-attention\/$/);
    const truth = readFileSync(join(root, 'www/samples/captions.jsonl'), 'utf8').trim().split('\n').map((l) => JSON.parse(l));
    for (const model of ['shapes-cross-attention', 'shapes-prefix']) {
      if (model === 'shapes-prefix') {
        await fresh.check('input[name=model][value=prefix]');
        await fresh.click('#load');
        await fresh.waitForFunction(() => ['ready', 'error'].includes(document.body.dataset.state), null, { timeout: 60_000 });
        assert.equal(await fresh.evaluate(() => document.body.dataset.state), 'ready', await fresh.locator('#error').textContent());
      }
      const reference = JSON.parse(readFileSync(join(root, 'models', model, 'reference.json'), 'utf8')).greedy_ids;
      for (const { image, caption } of truth) {
        await fresh.click(`.sample[title="${image}"]`);
        await fresh.waitForFunction(() => ['done', 'error'].includes(document.body.dataset.state), null, { timeout: 60_000 });
        assert.equal(await fresh.evaluate(() => document.body.dataset.state), 'done', await fresh.locator('#error').textContent());
        const ids = JSON.parse(await fresh.locator('#caption').getAttribute('data-token-ids'));
        assert.deepEqual(ids, reference[image], `${model} ${image}`);
        assert.equal((await fresh.locator('#caption').textContent()).trim(), caption, `${model} ${image}`);
      }
    }
  } finally {
    await fresh.close();
  }
});
