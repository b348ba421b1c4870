// The threaded build (pkg/threads/: wasm threads, a rayon pool of Web Workers) through the JS
// package in headless Chromium: chosen on a crossOriginIsolated page, refused elsewhere; on 2
// threads both architectures give 🤗 transformers' greedy ids, as on 1, and q8_0 the same
// captions. Run by `./build.sh test-pages` after pkg/ is built.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync } from 'node:fs';
import { readFile } from 'node:fs/promises';
import { join } from 'node:path';
import { startServer } from '../../www/serve.mjs';
import { launch, watchPage, printLog, root } from './helpers.mjs';

const IMAGE = 'tests/fixtures/images/astronaut.png';
const CASES = [
  { model: 'tests/fixtures/tiny-ved-v5', ids: () => reference('tests/fixtures/reference/tiny-ved-v5.json').images['astronaut.png'].greedy_ids },
  { model: 'tests/fixtures/prefix/tiny-llava-merged-v5', ids: () => reference('tests/fixtures/prefix/reference/merged-v5.json').images['astronaut.png'].noprompt.greedy_ids },
  // BLIP, with a prompt its caption continues.
  {
    model: 'tests/fixtures/blip/tiny-blip',
    ids: () => reference('tests/fixtures/blip/reference.json').images['astronaut.png'].prompt.greedy_ids,
    text: () => reference('tests/fixtures/blip/reference.json').images['astronaut.png'].prompt.greedy_text,
    options: { prompt: 'a picture of' },
  },
  // SmolVLM: the folder's chat template comes along, the image is cut into 3 × 3 tiles + 1.
  {
    model: 'tests/fixtures/idefics3/tiny-smolvlm',
    ids: () => reference('tests/fixtures/idefics3/reference.json').images['astronaut.png'].split.greedy_ids,
    options: { prompt: 'Describe this image.' },
  },
];
let server, browser, base;
const log = [];

function reference(path) {
  return JSON.parse(readFileSync(join(root, path), 'utf8'));
}

// A blank page of the server's origin; /plain/ without the COOP/COEP headers (not isolated).
async function blankPage(path) {
  const page = await browser.context.newPage();
  watchPage(page, log);
  await page.goto(`${base}${path}`);
  return page;
}

/** In `page`: load `model` with `options`, caption IMAGE → { threads, ids, text } or { error }. */
function captionIn(page, model, options, captionOptions = {}) {
  return page.evaluate(async ([model, image, options, captionOptions]) => {
    const { Captioner } = await import('/pkg/index.js');
    let captioner;
    try {
      captioner = await Captioner.fromPretrained(model, { cache: false, ...options });
      const result = await captioner.caption(image, captionOptions).result;
      return { threads: captioner.threads, isolated: self.crossOriginIsolated, ids: result.tokenIds, text: result.text };
    } catch (e) {
      return { error: e.message, isolated: self.crossOriginIsolated };
    } finally {
      captioner?.dispose();
    }
  }, [`${base}/${model}/`, `${base}/${IMAGE}`, options, captionOptions]);
}

before(async () => {
  server = await startServer(0, {
    async onRequest(req, res, headers) {
      if (req.url.startsWith('/broken/pkg/')) {
        // The package again, but the pool's worker script without COEP: as a deployer who set the
        // headers on the page and not on every script would serve it.
        const path = join(root, req.url.slice('/broken'.length).split('?')[0]);
        const type = path.endsWith('.wasm') ? 'application/wasm' : 'text/javascript';
        const answer = { ...headers, 'Content-Type': type };
        if (path.endsWith('workerHelpers.js')) delete answer['Cross-Origin-Embedder-Policy'];
        res.writeHead(200, answer);
        res.end(await readFile(path));
        return true;
      }
      if (req.url === '/threads-test.html' || req.url === '/broken/threads-test.html') {
        res.writeHead(200, { ...headers, 'Content-Type': 'text/html' });
      } else if (req.url === '/plain/threads-test.html') {
        res.writeHead(200, { 'Content-Type': 'text/html', 'Cache-Control': 'no-store' });
      } else return false;
      res.end('<!doctype html><link rel="icon" href="data:,"><title>threads</title>');
      return true;
    },
  });
  base = `http://127.0.0.1:${server.address().port}`;
  browser = await launch();
});

after(async () => {
  printLog(log);
  await browser?.close();
  server?.close();
});

test('a crossOriginIsolated page loads the threaded build; 2 threads give transformers\' greedy ids for every family, as 1 does', async () => {
  const page = await blankPage('/threads-test.html');
  for (const { model, ids, text, options } of CASES) {
    const expected = ids();
    for (const threads of [1, 2]) {
      const r = await captionIn(page, model, { threads }, { maxNewTokens: expected.length, ...options });
      assert.equal(r.error, undefined, `${model}, ${threads} threads: ${r.error}`);
      assert.equal(r.isolated, true);
      assert.equal(r.threads, threads);
      assert.deepEqual(r.ids, expected, `${model}, ${threads} threads`);
      if (text) assert.equal(r.text, text(), `${model}: the prompt, then the caption`);
    }
  }
  await page.close();
});

test('by default an isolated page uses the cores (the threaded build); q8_0 on threads keeps the embedded model\'s caption', async () => {
  const page = await blankPage('/threads-test.html');
  const cores = await page.evaluate(() => navigator.hardwareConcurrency);
  const model = 'models/shapes-prefix';
  const one = await captionIn(page, model, { threads: 1, quantize: 'q8_0' });
  const auto = await captionIn(page, model, { quantize: 'q8_0' });
  assert.equal(one.error, undefined, one.error);
  assert.equal(auto.error, undefined, auto.error);
  assert.equal(auto.threads, Math.min(8, cores));
  assert.ok(auto.threads > 1 || cores === 1, `threads ${auto.threads} on ${cores} cores`);
  assert.deepEqual(auto.ids, one.ids);
  assert.ok(one.text.length > 0);
  await page.close();
});

test('a page that is not crossOriginIsolated gets the single-threaded build; asking it for threads rejects with what to do', async () => {
  const page = await blankPage('/plain/threads-test.html');
  const model = CASES[0].model;
  const auto = await captionIn(page, model, {});
  assert.equal(auto.isolated, false);
  assert.equal(auto.error, undefined, auto.error);
  assert.equal(auto.threads, 1);
  const two = await captionIn(page, model, { threads: 2 });
  assert.match(two.error ?? '', /crossOriginIsolated.*Cross-Origin-Opener-Policy/);
  const bad = await captionIn(page, model, { threads: 0 });
  assert.match(bad.error ?? '', /threads must be a positive integer/);
  await page.close();
});

test('SmolVLM takes a conversation as messages, in transformers\' chat format', async () => {
  const page = await blankPage('/threads-test.html');
  const ref = reference('tests/fixtures/idefics3/reference.json');
  const messages = [{ role: 'user', content: [{ type: 'image' }, { type: 'text', text: ref.prompt }] }];
  const viaMessages = await captionIn(page, 'tests/fixtures/idefics3/tiny-smolvlm', { threads: 1 }, { messages, maxNewTokens: ref.max_new_tokens });
  assert.equal(viaMessages.error, undefined, viaMessages.error);
  assert.deepEqual(viaMessages.ids, ref.images['astronaut.png'].split.greedy_ids, 'one user turn as messages = the same turn as prompt');
  const both = await captionIn(page, 'tests/fixtures/idefics3/tiny-smolvlm', { threads: 1 }, { messages, prompt: 'x' });
  assert.match(both.error, /prompt or messages, not both/);
  await page.close();
});

test('SmolVLM reports its tiles through the encoder, a batch per step as wide as the threads, and stops between them on abort', async () => {
  const page = await blankPage('/threads-test.html');
  const ref = reference('tests/fixtures/idefics3/reference.json');
  const r = await page.evaluate(async ([model, image, prompt, max]) => {
    const { Captioner } = await import('/pkg/index.js');
    const out = {};
    for (const threads of [1, 2]) {
      const captioner = await Captioner.fromPretrained(model, { cache: false, threads });
      const seen = [];
      const { tokenIds } = await captioner.caption(image, { prompt, maxNewTokens: max, onEncode: (p) => seen.push(p) }).result;
      // Aborted after the first batch: the rest of the tiles are not encoded.
      const cut = [];
      const run = captioner.caption(image, { prompt, onEncode: (p) => { cut.push(p); run.abort(); } });
      const error = await run.result.then(() => null, (e) => e.name);
      const again = (await captioner.caption(image, { prompt, maxNewTokens: max }).result).tokenIds;
      captioner.dispose();
      out[threads] = { seen, tokenIds, cut, error, again };
    }
    return out;
  }, [`${base}/tests/fixtures/idefics3/tiny-smolvlm/`, `${base}/${IMAGE}`, ref.prompt, ref.max_new_tokens]);
  const want = ref.images['astronaut.png'].split.greedy_ids;
  for (const threads of [1, 2]) {
    const { seen, tokenIds, cut, error, again } = r[threads];
    const steps = Array.from({ length: Math.ceil(10 / threads) }, (_, i) => ({ encoded: Math.min(10, (i + 1) * threads), tiles: 10 }));
    assert.deepEqual(seen, steps, `${threads} threads: 10 tiles (3 × 3 + the whole image), ${threads} a step`);
    assert.deepEqual(tokenIds, want);
    assert.equal(error, 'AbortError');
    assert.ok(cut.length >= 1 && cut.at(-1).encoded < 10, `${threads} threads: stopped at ${JSON.stringify(cut)}`);
    assert.deepEqual(again, want, 'the captioner goes on after the abort');
  }
  await page.close();
});

test('an isolated page whose pool worker script lacks COEP: the load falls back to 1 thread after env.threadStartMs, says why, and captions', async () => {
  const page = await blankPage('/broken/threads-test.html');
  const { model, ids } = CASES[0];
  const expected = ids();
  const r = await page.evaluate(async ([model, image, n]) => {
    const { Captioner, env } = await import('/broken/pkg/index.js');
    env.threadStartMs = 3000;
    const captioner = await Captioner.fromPretrained(model, { cache: false, threads: 2 });
    try {
      const result = await captioner.caption(image, { maxNewTokens: n }).result;
      return { isolated: self.crossOriginIsolated, threads: captioner.threads, fallback: captioner.threadsFallback, ids: result.tokenIds };
    } finally {
      captioner.dispose();
    }
  }, [`${base}/${model}/`, `${base}/${IMAGE}`, expected.length]);
  assert.equal(r.isolated, true);
  assert.equal(r.threads, 1);
  assert.match(r.fallback ?? '', /did not start within 3000 ms/);
  assert.deepEqual(r.ids, expected);
  await page.close();
});
