// ViT + GPT-2 through the JS package (pkg/index.js) in headless Chromium: the folder laid out as
// nlpconnect/vit-gpt2-image-captioning ships it (no tokenizer.json: GPT-2's vocab.json +
// merges.txt; generation_config.json asking for 4 beams and max_length 16), served as a folder
// URL. Its captions are 🤗 transformers' (tests/fixtures/reference/tiny-vit-gpt2.json). The same
// folder with its weights as pytorch_model.bin or sharded (tests/fixtures/checkpoints/).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, existsSync } from 'node:fs';
import { join } from 'node:path';
import { startServer } from '../../www/serve.mjs';
import { startHub, commitOf } from '../hub-server.mjs';
import { launch, watchPage, printLog, root } from './helpers.mjs';

const MODEL = 'tests/fixtures/tiny-vit-gpt2';
const reference = JSON.parse(readFileSync(join(root, 'tests/fixtures/reference/tiny-vit-gpt2.json'), 'utf8'));
let server, browser, page, base;
const log = [];
const requested = [];

before(async () => {
  server = await startServer(0, {
    onRequest(req, res, headers) {
      requested.push(req.url);
      // /ckpt/VARIANT/FILE: tiny-vit-gpt2 with its weights as tests/fixtures/checkpoints/VARIANT has them.
      const m = req.url.match(/^\/ckpt\/([\w-]+)\/([\w.-]+)$/);
      if (m) {
        // sharded-missing: the sharded folder without its second shard.
        const variant = m[1] === 'sharded-missing' ? 'sharded-safetensors' : m[1];
        const gone = m[1] === 'sharded-missing' && m[2] === 'model-00002-of-00003.safetensors';
        const own = join(root, 'tests/fixtures/checkpoints', variant, m[2]);
        const shared = join(root, MODEL, m[2]);
        const file = gone ? null : existsSync(own) ? own : m[2] !== 'model.safetensors' && existsSync(shared) ? shared : null;
        if (!file) {
          res.writeHead(404, { ...headers, 'Content-Type': 'text/plain' });
          res.end('not found');
          return true;
        }
        const body = readFileSync(file);
        res.writeHead(200, { ...headers, 'Content-Type': 'application/octet-stream', 'Content-Length': String(body.byteLength) });
        res.end(body);
        return true;
      }
      if (req.url !== '/vit-test.html') return false;
      res.writeHead(200, { ...headers, 'Content-Type': 'text/html' });
      res.end('<!doctype html><link rel="icon" href="data:,"><title>vit</title>');
      return true;
    },
  });
  base = `http://127.0.0.1:${server.address().port}`;
  browser = await launch();
  page = await browser.context.newPage();
  watchPage(page, log);
  await page.goto(`${base}/vit-test.html`);
});

after(async () => {
  printLog(log);
  await page?.evaluate(() => window.captioner?.dispose()).catch(() => {});
  await browser?.close();
  server?.close();
});

test('a ViT-GPT2 folder without tokenizer.json loads from its URL; progress counts vocab.json and merges.txt', async () => {
  const files = await page.evaluate(async (model) => {
    const { Captioner } = await import('/pkg/index.js');
    const seen = new Set();
    window.captioner = await Captioner.fromPretrained(model, { cache: false, onProgress: (e) => e.file && seen.add(e.file) });
    return [...seen].sort();
  }, `${base}/${MODEL}/`);
  for (const f of ['config.json', 'model.safetensors', 'vocab.json', 'merges.txt', 'tokenizer_config.json', 'special_tokens_map.json']) {
    assert.ok(files.includes(f), `${f} loaded: ${files}`);
  }
  assert.ok(requested.some((u) => u.endsWith('/tokenizer.json')), 'tokenizer.json was asked for first');
});

test('by default (generation_config.json: 4 beams, max_length 16) the caption is generate()\'s; numBeams 1 streams the greedy ids', async () => {
  for (const image of ['astronaut.png', 'chelsea.jpg']) {
    const r = await page.evaluate(async (url) => {
      const byDefault = await window.captioner.caption(url).result;
      const run = window.captioner.caption(url, { numBeams: 1, maxNewTokens: 20 });
      const streamed = [];
      for await (const t of run) streamed.push(t.id);
      return { byDefault, streamed, greedy: await run.result };
    }, `${base}/tests/fixtures/images/${image}`);
    const want = reference.images[image];
    assert.deepEqual(r.byDefault.tokenIds, want.default_ids, `${image}: beam search from generation_config.json`);
    assert.equal(r.byDefault.text, want.default_text, image);
    assert.deepEqual(r.streamed, want.greedy_ids, `${image}: streamed greedy ids`);
    assert.equal(r.greedy.text, want.text, image);
  }
});

test('device webgpu: encoder and decoder on the GPU (SwiftShader here) caption as generate(), greedy and with the folder\'s 4 beams; captionMany too; auto picks it; dtype fp16 only where the adapter has shader-f16; a bad device or dtype is refused', async () => {
  const r = await page.evaluate(async ({ model, image }) => {
    const { Captioner } = await import('/pkg/index.js');
    const out = {};
    const c = await Captioner.fromPretrained(model, { cache: false, device: 'webgpu', threads: 1 });
    out.device = c.device;
    out.adapter = c.adapter;
    out.dtype = c.dtype;
    out.greedy = (await c.caption(image, { numBeams: 1, maxNewTokens: 20 }).result).tokenIds;
    out.byDefault = (await c.caption(image).result).tokenIds;
    // A batch, awaited on the GPU as one caption is: greedy, then the folder's beams.
    const both = [image, image.replace('astronaut.png', 'chelsea.jpg')];
    out.many = (await c.captionMany(both, { numBeams: 1, maxNewTokens: 20 }).result).map((r) => r.tokenIds);
    out.manyBeams = (await c.captionMany(both).result).map((r) => r.tokenIds);
    c.dispose();
    const auto = await Captioner.fromPretrained(model, { cache: false, device: 'auto', threads: 1 });
    out.auto = [auto.device, auto.deviceFallback];
    auto.dispose();
    // fp16 where the adapter has shader-f16; SwiftShader has not, so fp32 and the same ids.
    const half = await Captioner.fromPretrained(model, { cache: false, device: 'webgpu', dtype: 'fp16', threads: 1 });
    out.half = [half.dtype, (await half.caption(image, { numBeams: 1, maxNewTokens: 20 }).result).tokenIds];
    out.f16Feature = (await navigator.gpu.requestAdapter()).features.has('shader-f16');
    half.dispose();
    out.badDtype = await Captioner.fromPretrained(model, { cache: false, dtype: 'half' }).then(() => 'loaded', (e) => e.message);
    out.bad = await Captioner.fromPretrained(model, { cache: false, device: 'gpu' }).then(() => 'loaded', (e) => e.message);
    return out;
  }, { model: `${base}/${MODEL}/`, image: `${base}/tests/fixtures/images/astronaut.png` });
  const want = reference.images['astronaut.png'];
  assert.equal(r.device, 'webgpu');
  assert.ok(r.adapter, `an adapter is named: ${r.adapter}`);
  console.log(`# WebGPU adapter: ${r.adapter}`);
  assert.deepEqual(r.greedy, want.greedy_ids, 'greedy ids on WebGPU (encoder and decoder)');
  assert.deepEqual(r.byDefault, want.default_ids, 'beam search on WebGPU (encoder and decoder)');
  const photos = ['astronaut.png', 'chelsea.jpg'].map((name) => reference.images[name]);
  assert.deepEqual(r.many, photos.map((p) => p.greedy_ids), 'captionMany on WebGPU: greedy');
  assert.deepEqual(r.manyBeams, photos.map((p) => p.default_ids), 'captionMany on WebGPU: the folder\'s beams');
  assert.deepEqual(r.auto, ['webgpu', null], 'auto chooses the adapter there is');
  assert.match(r.bad, /device must be 'wasm', 'webgpu' or 'auto', not "gpu"/);
  assert.equal(r.dtype, 'fp32', 'the default storage');
  assert.equal(r.half[0], r.f16Feature ? 'fp16' : 'fp32', 'fp16 exactly where the adapter has shader-f16');
  if (!r.f16Feature) assert.deepEqual(r.half[1], want.greedy_ids, 'fp32 storage: greedy ids as generate()');
  assert.match(r.badDtype, /dtype must be 'fp32' or 'fp16', not "half"/);
});

test('numReturnSequences 2 with the folder\'s 4 beams: generate(num_return_sequences=2)', async () => {
  const r = await page.evaluate(async (url) => window.captioner.caption(url, { numReturnSequences: 2 }).result,
    `${base}/tests/fixtures/images/astronaut.png`);
  assert.deepEqual(r.sequences.map((s) => s.tokenIds), reference.images['astronaut.png'].two_sequences);
});

test('pytorch_model.bin and sharded checkpoints load from a folder URL: the shards the index names, progress summed over them', async () => {
  const want = reference.images['astronaut.png'].greedy_ids.slice(0, 8);
  for (const [variant, files] of [
    ['bin-f32', ['pytorch_model.bin']],
    ['sharded-safetensors', ['model.safetensors.index.json', 'model-00001-of-00003.safetensors', 'model-00002-of-00003.safetensors', 'model-00003-of-00003.safetensors']],
  ]) {
    const r = await page.evaluate(async ({ model, image }) => {
      const { Captioner } = await import('/pkg/index.js');
      const seen = new Set();
      let last;
      const c = await Captioner.fromPretrained(model, { cache: false, onProgress: (e) => { if (e.file) seen.add(e.file); last = e; } });
      const ids = (await c.caption(image, { numBeams: 1, maxNewTokens: 8 }).result).tokenIds;
      c.dispose();
      return { ids, seen: [...seen], last };
    }, { model: `${base}/ckpt/${variant}/`, image: `${base}/tests/fixtures/images/astronaut.png` });
    assert.deepEqual(r.ids, want, `${variant}: the greedy ids of model.safetensors`);
    for (const f of files) assert.ok(r.seen.includes(f), `${variant}: ${f} in the progress events (${r.seen})`);
    const bytes = files.reduce((n, f) => n + readFileSync(join(root, 'tests/fixtures/checkpoints', variant, f)).byteLength, 0);
    assert.ok(r.last.done && r.last.fraction === 1 && r.last.total >= bytes, `${variant}: total ${r.last.total} covers the ${bytes} weight bytes`);
  }
  // A shard the index names that the server does not have: the error names it.
  const error = await page.evaluate(async (model) => {
    const { Captioner } = await import('/pkg/index.js');
    return Captioner.fromPretrained(model, { cache: false }).then(() => 'loaded', (e) => e.message);
  }, `${base}/ckpt/sharded-missing/`);
  assert.match(error, /model-0000\d-of-00003\.safetensors/);
});

test('with env.maxPieceBytes below the file sizes, the weights stream into WASM and the Cache API, and load again from it', async () => {
  const want = reference.images['astronaut.png'].greedy_ids.slice(0, 8);
  const r = await page.evaluate(async ({ model, image }) => {
    const { Captioner, env, clearCache } = await import('/pkg/index.js');
    await clearCache(model);
    const saved = env.maxPieceBytes;
    env.maxPieceBytes = 5003;
    try {
      const load = async () => {
        let cached = false;
        const c = await Captioner.fromPretrained(model, { onProgress: (e) => { if (e.file === 'pytorch_model.bin') cached = e.cached; } });
        const ids = (await c.caption(image, { numBeams: 1, maxNewTokens: 8 }).result).tokenIds;
        c.dispose();
        return { ids, cached };
      };
      return [await load(), await load()];
    } finally {
      env.maxPieceBytes = saved;
      await clearCache(model);
    }
  }, { model: `${base}/ckpt/bin-f32/`, image: `${base}/tests/fixtures/images/astronaut.png` });
  assert.deepEqual(r.map((x) => x.ids), [want, want]);
  assert.deepEqual(r.map((x) => x.cached), [false, true], 'the second load reads the cached Blob');
});

test('a hub id loads from remoteHost (env.remoteHost or the option), at a revision, through the fetch given', async () => {
  // tests/hub-server.mjs: the fixture folder as tiny/vit-gpt2, on another origin, as the hub is.
  const hub = await startHub({ 'tiny/vit-gpt2': { base: join(root, MODEL) } });
  const commit = commitOf('tiny/vit-gpt2');
  const want = reference.images['astronaut.png'].greedy_ids.slice(0, 6);
  try {
    const r = await page.evaluate(async ({ host, image, commit }) => {
      const { Captioner, env } = await import('/pkg/index.js');
      const run = async (id, options) => {
        const c = await Captioner.fromPretrained(id, { cache: false, ...options });
        const ids = (await c.caption(image, { numBeams: 1, maxNewTokens: 6 }).result).tokenIds;
        c.dispose();
        return ids;
      };
      const urls = [];
      const fetch = (url, init) => { urls.push(String(url)); return globalThis.fetch(url, init); };
      const viaOption = await run('tiny/vit-gpt2', { remoteHost: host, fetch });
      const saved = env.remoteHost;
      env.remoteHost = host;
      const viaEnv = await run(`tiny/vit-gpt2@${commit}`);
      const unknown = await Captioner.fromPretrained('tiny/nope', { cache: false }).then(() => 'loaded', (e) => e.message);
      const badRevision = await Captioner.fromPretrained('tiny/vit-gpt2', { cache: false, revision: 'v9' }).then(() => 'loaded', (e) => e.message);
      env.remoteHost = saved;
      return { viaOption, viaEnv, urls, unknown, badRevision };
    }, { host: hub.url, image: `${base}/tests/fixtures/images/astronaut.png`, commit });
    assert.deepEqual(r.viaOption, want);
    assert.deepEqual(r.viaEnv, want);
    assert.ok(r.urls.length > 0 && r.urls.every((u) => u.startsWith(`${hub.url}tiny/vit-gpt2/resolve/main/`)), r.urls.join('\n'));
    assert.ok(hub.requests.some((q) => q.url === `/tiny/vit-gpt2/resolve/${commit}/config.json`), 'the @revision is in the URL');
    // The hub answers an unknown repository with 401 (RepositoryNotFound), an unknown revision with 404.
    assert.match(r.unknown, /config\.json: HTTP 401/);
    assert.match(r.badRevision, /config\.json: HTTP 404/);
  } finally {
    hub.server.close();
  }
});
