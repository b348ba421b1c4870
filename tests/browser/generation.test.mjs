// Generation options through the JS package (pkg/index.js) in headless Chromium, on tiny-ved-v4
// (whose EOS token some runs reach): beam search gives the native CLI's and 🤗 transformers' ids,
// seeded sampling is reproducible and equals the CLI, processors pass through, and bad values
// reject with the Rust message (unknown keys with the shim's). Run by `./build.sh test-pages` after pkg/ is built.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { readFileSync } from 'node:fs';
import { join } from 'node:path';
import { startServer } from '../../www/serve.mjs';
import { launch, watchPage, printLog, root } from './helpers.mjs';

const MODEL = 'tests/fixtures/tiny-ved-v4';
const IMAGE = 'tests/fixtures/images/astronaut.png';
let server, browser, page, base;
let modelRequests = 0;
// /versioned/FILE: tiny-ved-v5's files with an ETag per version; version 2 changes
// generation_config.json. Counts full answers and 304s.
let version = 1;
const versioned = { full: 0, notModified: 0 };
const log = [];

/** The native CLI's JSON for `flags` (CAPTION_BIN, else `cargo run`), as helpers.mjs runs it. */
function native(...flags) {
  const args = ['--model', MODEL, '--json', ...flags, IMAGE];
  const out = process.env.CAPTION_BIN
    ? execFileSync(process.env.CAPTION_BIN, args, { cwd: root, encoding: 'utf8' })
    : execFileSync('cargo', ['run', '-q', '--bin', 'caption', '--', ...args], { cwd: root, encoding: 'utf8' });
  return JSON.parse(out.trim().split('\n').at(-1));
}

/** In the page: one caption with `options` → { tokens (streamed ids), result } or { error }. */
function caption(options, image = `${base}/${IMAGE}`) {
  return page.evaluate(async ([image, options]) => {
    const run = window.captioner.caption(image, options);
    const tokens = [];
    try {
      for await (const t of run) tokens.push('id' in t ? t.id : { provisional: t.provisional, tokenIds: t.tokenIds });
      return { tokens, result: await run.result };
    } catch (e) {
      return { tokens, error: e.message, resultError: await run.result.then(() => null, (r) => r.message) };
    }
  }, [image, options]);
}

before(async () => {
  // A blank page of the server's origin that imports the package.
  server = await startServer(0, {
    onRequest(req, res, headers) {
      if (req.url.startsWith(`/${MODEL}/`)) modelRequests += 1;
      if (req.url.startsWith('/versioned/')) {
        const name = req.url.slice('/versioned/'.length);
        const etag = `"v${version}-${name}"`;
        if (req.headers['if-none-match'] === etag) {
          versioned.notModified += 1;
          res.writeHead(304, { ...headers, ETag: etag });
          res.end();
          return true;
        }
        let body;
        try {
          body = readFileSync(join(root, 'tests/fixtures/tiny-ved-v5', name));
        } catch {
          res.writeHead(404, headers);
          res.end();
          return true;
        }
        if (name === 'generation_config.json' && version === 2) body = Buffer.from(JSON.stringify({ ...JSON.parse(body), num_beams: 2 }));
        versioned.full += 1;
        res.writeHead(200, { ...headers, ETag: etag, 'Content-Length': body.length });
        res.end(body);
        return true;
      }
      if (req.url !== '/generation-test.html') return false;
      res.writeHead(200, { ...headers, 'Content-Type': 'text/html' });
      res.end('<!doctype html><link rel="icon" href="data:,"><title>generation</title>');
      return true;
    },
  });
  base = `http://127.0.0.1:${server.address().port}`;
  browser = await launch();
  page = await browser.context.newPage();
  watchPage(page, log);
  await page.goto(`${base}/generation-test.html`);
  await page.evaluate(async (model) => {
    const { Captioner } = await import('/pkg/index.js');
    window.captioner = await Captioner.fromPretrained(model, { cache: false });
  }, `${base}/${MODEL}/`);
});

after(async () => {
  printLog(log);
  await page?.evaluate(() => window.captioner?.dispose()).catch(() => {});
  await browser?.close();
  server?.close();
});

function assertBeam(r, expected, label) {
  assert.equal(r.error, undefined, `${label}: ${r.error}`);
  const { result } = r;
  // Streamed: the best running hypothesis after each step (provisional), then the final best.
  assert.ok(r.tokens.length >= 2, `${label}: provisional hypotheses`);
  for (const [i, t] of r.tokens.entries()) {
    assert.equal(t.provisional, i < r.tokens.length - 1, `${label}: event ${i}`);
    if (i < r.tokens.length - 1) assert.equal(t.tokenIds.length, i + 1, `${label}: step ${i + 1}'s hypothesis`);
  }
  assert.deepEqual(r.tokens.at(-1).tokenIds, result.tokenIds, `${label}: the last event is the final best`);
  assert.deepEqual(result.sequences.map((s) => s.tokenIds), expected.map((s) => s.tokenIds), label);
  for (const [i, s] of result.sequences.entries()) {
    if (expected[i].text !== undefined) assert.equal(s.text, expected[i].text, `${label}: text ${i}`);
    assert.ok(Math.abs(s.score - expected[i].score) < 1e-3, `${label}: score ${i}: ${s.score} vs ${expected[i].score}`);
  }
  assert.deepEqual([result.text, result.tokenIds, result.score], [result.sequences[0].text, result.sequences[0].tokenIds, result.sequences[0].score]);
  assert.equal(typeof result.timings.totalMs, 'number');
}

test('beam search (4 beams, 2 returned, 20 tokens) gives the native CLI ids, best first', async () => {
  const cli = native('--max-new-tokens', '20', '--num-beams', '4', '--num-return-sequences', '2');
  assert.equal(cli.sequences.length, 2);
  const expected = cli.sequences.map((s) => ({ tokenIds: s.token_ids, text: s.text, score: s.score }));
  const r = await caption({ numBeams: 4, numReturnSequences: 2, maxNewTokens: 20 });
  assertBeam(r, expected, 'CLI');
  assert.ok(r.result.sequences[0].score >= r.result.sequences[1].score);
});

test('beam search equals 🤗 transformers (generation fixture), early stopping and an EOS hypothesis', async () => {
  const fixture = JSON.parse(readFileSync(join(root, 'tests/fixtures/generation/beam.json'), 'utf8'));
  const cases = [
    { numBeams: 4, maxNewTokens: 12, lengthPenalty: 1, earlyStopping: true, numReturnSequences: 2 },
    { numBeams: 3, maxNewTokens: 10, lengthPenalty: 0.5, earlyStopping: 'never', numReturnSequences: 3 },
  ];
  let sawEos = false;
  for (const o of cases) {
    const run = fixture.runs.find((x) => x.model === 'tiny-ved-v4' && x.image === 'astronaut.png' && !x.eos_override &&
      x.prompt_key === null && x.num_beams === o.numBeams && x.max_new_tokens === o.maxNewTokens &&
      x.length_penalty === o.lengthPenalty && x.early_stopping === o.earlyStopping && x.num_return_sequences === o.numReturnSequences);
    assert.ok(run, JSON.stringify(o));
    sawEos ||= run.returned_eos;
    const r = await caption(o);
    assertBeam(r, run.sequences.map((ids, i) => ({ tokenIds: ids, score: run.sequences_scores[i] })), JSON.stringify(o));
  }
  assert.ok(sawEos, 'one case returns a hypothesis that ends with EOS');
});

test('beam search takes every image input; unknown keys reject; doSample samples beams', async () => {
  const r = await page.evaluate(async (url) => {
    const blob = await (await fetch(url)).blob();
    const bitmap = await createImageBitmap(blob);
    const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
    canvas.getContext('2d').drawImage(bitmap, 0, 0);
    const imageData = canvas.getContext('2d').getImageData(0, 0, bitmap.width, bitmap.height);
    const fail = (image, options) => window.captioner.caption(image, options).result.then(() => null, (e) => e.message);
    const ids = async (image, options) => (await window.captioner.caption(image, options).result).tokenIds;
    return {
      imageData: await ids(imageData, { numBeams: 2, maxNewTokens: 6 }),
      bitmap: await ids(bitmap, { numReturnSequences: 2, numBeams: 2, maxNewTokens: 6 }),
      blob: await ids(blob, { numBeams: 2, maxNewTokens: 6 }),
      unknown: await fail(blob, { numBeams: 2, beams: 2 }),
      sampled: (await window.captioner.caption(blob, { numBeams: 2, doSample: true, seed: 3, maxNewTokens: 5 }).result).tokenIds.length,
      tooMany: await fail(blob, { numBeams: 2, numReturnSequences: 3 }),
      file: (await window.captioner.caption(new File([blob], 'a.png'), { numBeams: 2, maxNewTokens: 4 }).result).tokenIds.length,
    };
  }, `${base}/${IMAGE}`);
  // Canvas pixels of a PNG are its decoded pixels: the same beams as the bytes.
  assert.deepEqual(r.imageData, r.blob);
  assert.deepEqual(r.bitmap, r.blob);
  assert.match(r.unknown ?? '', /^generation: invalid options: unknown field `beams`/);
  assert.equal(r.sampled, 5, 'beam sampling');
  assert.match(r.tooMany ?? '', /num_return_sequences \(3\) must be between 1 and num_beams \(2\)/);
  assert.equal(r.file, 4);
});

test('seeded sampling: same ids twice, equal to the CLI; top-k 1 is greedy', async () => {
  const cli = native('--max-new-tokens', '12', '--do-sample', '--seed', '7');
  const greedy = native('--max-new-tokens', '12');
  const a = await caption({ doSample: true, seed: 7, maxNewTokens: 12 });
  const b = await caption({ doSample: true, seed: 7, maxNewTokens: 12 });
  const k1 = await caption({ doSample: true, seed: 7, maxNewTokens: 12, topK: 1 });
  const plain = await caption({ maxNewTokens: 12, numBeams: 1 }); // numBeams 1: greedy, streamed
  for (const r of [a, b, k1, plain]) {
    assert.equal(r.error, undefined, r.error);
    assert.deepEqual(r.tokens, r.result.tokenIds, 'streamed ids = result ids');
  }
  assert.deepEqual(a.result.tokenIds, b.result.tokenIds);
  assert.deepEqual(a.result.tokenIds, cli.token_ids);
  assert.equal(a.result.text, cli.text);
  assert.notDeepEqual(a.result.tokenIds, greedy.token_ids, 'seed 7 samples away from greedy');
  assert.deepEqual(k1.result.tokenIds, greedy.token_ids);
  assert.deepEqual(plain.result.tokenIds, greedy.token_ids);
});

test('processor options reach Rust unchanged (repetition penalty, no-repeat n-gram, bad words, min tokens)', async () => {
  const cli = native('--max-new-tokens', '12', '--repetition-penalty', '1.5', '--no-repeat-ngram-size', '2',
    '--bad-words-ids', '[[1812]]', '--min-new-tokens', '3');
  const r = await caption({ maxNewTokens: 12, repetitionPenalty: 1.5, noRepeatNgramSize: 2, badWordsIds: [[1812]], minNewTokens: 3, topP: undefined });
  assert.equal(r.error, undefined, r.error);
  assert.deepEqual(r.result.tokenIds, cli.token_ids);
  assert.ok(!r.result.tokenIds.includes(1812));
  assert.notDeepEqual(r.result.tokenIds, native('--max-new-tokens', '12').token_ids);
});

test('invalid options reject with a clear message; the captioner keeps working', async () => {
  const topP = await caption({ doSample: true, topP: 1.5, maxNewTokens: 4 });
  assert.match(topP.error ?? '', /top_p must be in \(0, 1\], got 1\.5/);
  assert.equal(topP.resultError, topP.error);
  // Unknown keys are refused by Rust (src/generation.rs), whichever mode the options ask for.
  const unknown = await caption({ maxNewTokens: 4, beams: 2 });
  assert.match(unknown.error ?? '', /^generation: invalid options: unknown field `beams`/);
  // A beam setting with one beam is taken and unused, as generate() takes it.
  const beamOnly = await caption({ maxNewTokens: 4, lengthPenalty: 2 });
  assert.equal(beamOnly.error, undefined, beamOnly.error);
  const badType = await caption({ maxNewTokens: 4, topK: 'x' });
  assert.match(badType.error ?? '', /invalid options: .*invalid type: string "x"/);
  const badEarly = await caption({ numBeams: 2, maxNewTokens: 4, earlyStopping: 'sometimes' });
  assert.match(badEarly.error ?? '', /early_stopping must be true, false or "never"/);
  // Several sequences need as many beams, as generate() says (the CLI says the same).
  const greedyTwo = await caption({ maxNewTokens: 4, numReturnSequences: 2 });
  assert.match(greedyTwo.error ?? '', /num_return_sequences \(2\) must be between 1 and num_beams \(1\)/);
  const ok = await caption({ maxNewTokens: 4 });
  assert.equal(ok.error, undefined, ok.error);
  assert.equal(ok.result.tokenIds.length, 4);
});

test('captionMany: one batch, every image\'s tokens streamed with its index, the same captions as one by one', async () => {
  const urls = ['astronaut.png', 'chelsea.jpg', 'coffee_rgba.png'].map((f) => `${base}/tests/fixtures/images/${f}`);
  const r = await page.evaluate(async (urls) => {
    const c = window.captioner;
    const alone = [];
    for (const u of urls) alone.push((await c.caption(u, { maxNewTokens: 12 }).result).tokenIds);
    // One image as ImageData (the RGBA path), the others as URLs.
    const blob = await (await fetch(urls[1])).blob();
    const bitmap = await createImageBitmap(blob, { colorSpaceConversion: 'none' });
    const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
    canvas.getContext('2d').drawImage(bitmap, 0, 0);
    const pixels = canvas.getContext('2d').getImageData(0, 0, bitmap.width, bitmap.height);
    const viaRgba = (await c.caption(pixels, { maxNewTokens: 12 }).result).tokenIds;
    const run = c.captionMany([urls[0], pixels, urls[2]], { maxNewTokens: 12 });
    const streamed = [[], [], []];
    for await (const e of run) streamed[e.index].push(e.id);
    const many = (await run.result).map((x) => x.tokenIds);
    const beamAlone = (await c.caption(urls[0], { numBeams: 3, maxNewTokens: 8 }).result).tokenIds;
    const beamRun = c.captionMany(urls, { numBeams: 3, maxNewTokens: 8 });
    const provisional = [];
    for await (const e of beamRun) provisional.push([e.index, e.provisional]);
    const beams = await beamRun.result;
    const empty = await c.captionMany([], {}).result.then(() => null, (e) => e.message);
    return { alone, viaRgba, many, streamed, beamAlone, beams: beams.map((b) => b.tokenIds), sequences: beams[0].sequences.length, provisional, empty };
  }, urls);
  assert.deepEqual(r.many[0], r.alone[0]);
  assert.deepEqual(r.many[1], r.viaRgba);
  assert.deepEqual(r.many[2], r.alone[2]);
  assert.deepEqual(r.streamed, r.many, 'streamed ids per image = results');
  assert.deepEqual(r.beams[0], r.beamAlone);
  assert.equal(r.sequences, 1);
  assert.ok(r.provisional.length >= 3 && r.provisional.every(([i, p]) => [0, 1, 2].includes(i) && p === true));
  assert.equal(r.empty, 'captionMany: no images');
});

test('generation_config.json defaults: a model that asks for 3 beams beam-searches unless numBeams: 1 is passed', async () => {
  const r = await page.evaluate(async ([base, model, image]) => {
    const { Captioner } = await import('/pkg/index.js');
    const files = {};
    for (const f of ['config.json', 'model.safetensors', 'tokenizer.json', 'preprocessor_config.json', 'generation_config.json']) {
      files[f] = await (await fetch(`${base}/${model}/${f}`)).blob();
    }
    const generation = JSON.parse(await files['generation_config.json'].text());
    Object.assign(generation, { num_beams: 3, no_repeat_ngram_size: 2, max_new_tokens: 7 });
    files['generation_config.json'] = new Blob([JSON.stringify(generation)]);
    const c = await Captioner.fromPretrained(files, { cache: false });
    try {
      const url = `${base}/${image}`;
      const byDefault = await c.caption(url).result;
      const greedy = await c.caption(url, { numBeams: 1 }).result;
      const explicitBeams = await window.captioner.caption(url, { numBeams: 3, noRepeatNgramSize: 2, maxNewTokens: 7 }).result;
      const explicitGreedy = await window.captioner.caption(url, { noRepeatNgramSize: 2, maxNewTokens: 7 }).result;
      return { defaults: c.generationDefaults, byDefault, greedy, explicitBeams, explicitGreedy };
    } finally {
      c.dispose();
    }
  }, [base, MODEL, IMAGE]);
  assert.equal(r.defaults.numBeams, 3);
  assert.ok(Array.isArray(r.byDefault.sequences), 'beam search by default');
  assert.deepEqual(r.byDefault.tokenIds, r.explicitBeams.tokenIds);
  assert.equal(r.greedy.sequences, undefined);
  assert.deepEqual(r.greedy.tokenIds, r.explicitGreedy.tokenIds);
});

test('quantize: q8_0 at load gives the embedded model the same caption; a bad format rejects', async () => {
  const r = await page.evaluate(async (base) => {
    const { Captioner } = await import('/pkg/index.js');
    const model = `${base}/models/shapes-cross-attention/`;
    const image = `${base}/www/samples/shapes-test-1.png`;
    const f32 = await Captioner.fromPretrained(model, { cache: false });
    const q8 = await Captioner.fromPretrained(model, { cache: false, quantize: 'q8_0' });
    try {
      const a = await f32.caption(image).result;
      const b = await q8.caption(image).result;
      const bad = await Captioner.fromPretrained(model, { cache: false, quantize: 'q3' }).then(() => null, (e) => e.message);
      return { a: a.tokenIds, b: b.tokenIds, text: b.text, bad };
    } finally {
      f32.dispose();
      q8.dispose();
    }
  }, base);
  assert.deepEqual(r.b, r.a);
  assert.equal(r.text, 'a green square left of a yellow square');
  assert.match(r.bad ?? '', /q8_0 or q4_0/);
});

test('a trap in WASM rejects that call with WasmcapCrashError; a fresh worker reloads the model from the Cache API and the next caption is the same', async () => {
  const options = { numBeams: 1, maxNewTokens: 12 };
  const before = await page.evaluate(async ([model, image, options]) => {
    const { Captioner } = await import('/pkg/index.js');
    window.trapped = await Captioner.fromPretrained(model); // cached in the Cache API
    return (await window.trapped.caption(image, options).result).tokenIds;
  }, [`${base}/${MODEL}/`, `${base}/${IMAGE}`, options]);
  const requests = modelRequests;
  const out = await page.evaluate(async ([image, options]) => {
    const c = window.trapped;
    const trap = await c._trapForTesting().then(() => null, (e) => ({ name: e.name, message: e.message }));
    // Called while the fresh worker is still loading: it waits, then captions.
    const { tokenIds } = await c.caption(image, options).result;
    const restarts = c.restarts;
    c.dispose();
    return { trap, tokenIds, restarts };
  }, [`${base}/${IMAGE}`, options]);
  assert.equal(out.trap?.name, 'WasmcapCrashError', JSON.stringify(out.trap));
  assert.match(out.trap.message, /unreachable/);
  assert.deepEqual(out.tokenIds, before);
  assert.equal(out.restarts, 1);
  assert.equal(modelRequests, requests, 'the reload reads the Cache API, not the server');
  await page.evaluate((model) => import('/pkg/index.js').then(({ Captioner }) => Captioner.clearCache(model)), `${base}/${MODEL}/`);
});

test('WebP and GIF bytes (an ArrayBuffer, no MIME type) go to the browser\'s decoder and caption as Pillow\'s decode of them does; undecodable bytes say so', async () => {
  const r = await page.evaluate(async (base) => {
    const ids = async (image) => (await window.captioner.caption(image, { numBeams: 1, maxNewTokens: 10 }).result).tokenIds;
    const bytes = async (path) => (await fetch(`${base}/tests/fixtures/formats/${path}`)).arrayBuffer();
    const out = {};
    for (const f of ['lossless.webp', 'palette.gif']) {
      out[f] = { ours: await ids(await bytes(f)), pillow: await ids(await bytes(f.replace(/\.\w+$/, '.png'))) };
    }
    out.bad = await window.captioner.caption(new Uint8Array([0x52, 0x49, 0x46, 0x46, 1, 2, 3, 4, 5])).result.then(() => null, (e) => e.message);
    return out;
  }, base);
  for (const f of ['lossless.webp', 'palette.gif']) assert.deepEqual(r[f].ours, r[f].pillow, f);
  assert.match(r.bad ?? '', /not a PNG or JPEG, and the browser cannot decode it either.*52 49 46 46/);
});

test('the Cache API revalidates: unchanged files come back as 304 with no body, a file whose ETag changed is fetched again', async () => {
  const load = () => page.evaluate(async (model) => {
    const { Captioner } = await import('/pkg/index.js');
    const c = await Captioner.fromPretrained(model);
    const numBeams = c.generationDefaults.numBeams;
    c.dispose();
    return numBeams;
  }, `${base}/versioned/`);
  const first = await load();
  const fetched = versioned.full;
  assert.ok(fetched >= 5, `the first load fetches every file (${fetched})`);
  assert.equal(await load(), first);
  assert.equal(versioned.full, fetched, 'nothing fetched again');
  assert.ok(versioned.notModified >= 5, `${versioned.notModified} answers 304`);
  version = 2;
  assert.equal(await load(), 2, 'the changed generation_config.json is read');
  assert.ok(versioned.full >= fetched + 5, 'every file with a new ETag came again');
  await page.evaluate((model) => import('/pkg/index.js').then(({ Captioner }) => Captioner.clearCache(model)), `${base}/versioned/`);
});
