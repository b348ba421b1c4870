// The npm package in Node.js (pkg/node.js, the package's `node` export): the ViT-GPT2 fixture
// folder from a path and as a hub id (through tests/hub-server.mjs, into a hub cache under
// a temporary HF_HOME, then again with the server gone), images as paths, bytes and RGBA,
// streaming, beam search, captionMany, abort — every caption equal to 🤗 transformers'
// (tests/fixtures/reference/tiny-vit-gpt2.json).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { readFileSync, readdirSync, statSync, mkdtempSync, lstatSync, existsSync, rmSync } from 'node:fs';
import { execFileSync } from 'node:child_process';
import { deflateSync } from 'node:zlib';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath, pathToFileURL } from 'node:url';
import { startHub, commitOf } from '../hub-server.mjs';

const root = fileURLToPath(new URL('../../', import.meta.url));
const MODEL = join(root, 'tests/fixtures/tiny-vit-gpt2');
const image = (name) => join(root, 'tests/fixtures/images', name);
const reference = JSON.parse(readFileSync(join(root, 'tests/fixtures/reference/tiny-vit-gpt2.json'), 'utf8'));
const home = mkdtempSync(join(tmpdir(), 'wasmcap-node-'));
process.env.HF_HOME = home;
for (const k of ['HF_HUB_CACHE', 'HF_HUB_OFFLINE', 'HF_TOKEN']) delete process.env[k];

const { Captioner, env, snapshotDownload } = await import(join(root, 'pkg/node.js'));

let captioner;
before(async () => {
  captioner = await Captioner.fromPretrained(MODEL);
});

after(() => {
  captioner?.dispose();
  rmSync(home, { recursive: true, force: true });
});

const greedy = { numBeams: 1, maxNewTokens: 20 };

test('a folder path: streamed greedy ids and the folder\'s beam search are transformers\'', async () => {
  for (const name of ['astronaut.png', 'chelsea.jpg']) {
    const want = reference.images[name];
    const run = captioner.caption(image(name), greedy);
    const streamed = [];
    for await (const t of run) streamed.push(t.id);
    assert.deepEqual(streamed, want.greedy_ids, name);
    assert.equal((await run.result).text, want.text);
    const beams = await captioner.caption(image(name)).result;
    assert.deepEqual(beams.tokenIds, want.default_ids, `${name}: generation_config.json's 4 beams`);
  }
});

// A PNG of RGBA pixels (filter 0 on every row), to compare RGBA input with the bytes it encodes.
function png(width, height, rgba) {
  const crcTable = Array.from({ length: 256 }, (_, n) => {
    let c = n;
    for (let k = 0; k < 8; k++) c = c & 1 ? 0xedb88320 ^ (c >>> 1) : c >>> 1;
    return c >>> 0;
  });
  const crc = (bytes) => {
    let c = 0xffffffff;
    for (const b of bytes) c = crcTable[(c ^ b) & 0xff] ^ (c >>> 8);
    return (c ^ 0xffffffff) >>> 0;
  };
  const chunk = (type, data) => {
    const body = Buffer.concat([Buffer.from(type, 'latin1'), data]);
    const out = Buffer.alloc(8 + data.length + 4);
    out.writeUInt32BE(data.length, 0);
    body.copy(out, 4);
    out.writeUInt32BE(crc(body), 8 + data.length);
    return out;
  };
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(width, 0);
  ihdr.writeUInt32BE(height, 4);
  ihdr.set([8, 6, 0, 0, 0], 8);
  const raw = Buffer.alloc(height * (1 + width * 4));
  for (let y = 0; y < height; y++) Buffer.from(rgba.subarray(y * width * 4, (y + 1) * width * 4)).copy(raw, y * (1 + width * 4) + 1);
  return Buffer.concat([Buffer.from([137, 80, 78, 71, 13, 10, 26, 10]), chunk('IHDR', ihdr), chunk('IDAT', deflateSync(raw)), chunk('IEND', Buffer.alloc(0))]);
}

test('images as a path, a file URL, a Buffer, a Uint8Array, an ArrayBuffer and RGBA pixels', async () => {
  const want = reference.images['chelsea.jpg'].greedy_ids;
  const bytes = readFileSync(image('chelsea.jpg'));
  for (const input of [pathToFileURL(image('chelsea.jpg')), bytes, new Uint8Array(bytes), bytes.buffer.slice(bytes.byteOffset, bytes.byteOffset + bytes.length)]) {
    assert.deepEqual((await captioner.caption(input, greedy).result).tokenIds, want, String(input?.constructor?.name));
  }
  const [w, h] = [37, 23];
  const rgba = new Uint8Array(w * h * 4).map((_, i) => (i % 4 === 3 ? 255 : (i * 37 + (i >> 7) * 11) % 256));
  const fromPixels = (await captioner.caption({ data: rgba, width: w, height: h }, greedy).result).tokenIds;
  const fromPng = (await captioner.caption(png(w, h, rgba), greedy).result).tokenIds;
  assert.deepEqual(fromPixels, fromPng, 'RGBA pixels caption as the PNG that holds them');
  assert.equal(rgba[3], 255, 'the caller keeps its pixels');
});

test('captionMany and numReturnSequences as in the browser; abort stops a caption and the captioner goes on', async () => {
  const many = await captioner.captionMany([image('astronaut.png'), image('chelsea.jpg')], greedy).result;
  assert.deepEqual(many.map((r) => r.tokenIds), [reference.images['astronaut.png'].greedy_ids, reference.images['chelsea.jpg'].greedy_ids]);
  const two = await captioner.caption(image('astronaut.png'), { numReturnSequences: 2 }).result;
  assert.deepEqual(two.sequences.map((s) => s.tokenIds), reference.images['astronaut.png'].two_sequences);
  const controller = new AbortController();
  const run = captioner.caption(image('astronaut.png'), { ...greedy, signal: controller.signal });
  controller.abort();
  await assert.rejects(run.result, { name: 'AbortError' });
  assert.deepEqual((await captioner.caption(image('astronaut.png'), greedy).result).tokenIds, reference.images['astronaut.png'].greedy_ids);
});

test('captions asked for while another runs wait their turn: each streams whole, in order, with transformers\' ids', async () => {
  // The second call's image is bytes already in memory, ready before the first's file is read:
  // it still goes second.
  const names = ['chelsea.jpg', 'astronaut.png', 'astronaut.png'];
  const inputs = [image(names[0]), readFileSync(image(names[1])), image(names[2])];
  const order = [];
  const runs = names.map((name, i) => {
    const run = captioner.caption(inputs[i], greedy);
    return (async () => {
      const ids = [];
      for await (const t of run) { ids.push(t.id); order.push(i); }
      return ids;
    })();
  });
  const got = await Promise.all(runs);
  names.forEach((name, i) => assert.deepEqual(got[i], reference.images[name].greedy_ids, `${name} (call ${i})`));
  // Never interleaved: every token of call 0, then of call 1, then of call 2.
  assert.deepEqual(order, [...order].sort((a, b) => a - b));
});

test('a trap in the WASM instance: that call rejects with WasmcapCrashError, the worker restarts with the model, the next caption is transformers\'', async () => {
  const c = await Captioner.fromPretrained(MODEL);
  try {
    const want = reference.images['astronaut.png'].greedy_ids;
    const trap = await c._trapForTesting().then(() => null, (e) => e);
    assert.equal(trap?.name, 'WasmcapCrashError');
    assert.match(trap.message, /unreachable/);
    // Called while the fresh worker is still loading: waits for it.
    const { tokenIds } = await c.caption(image('astronaut.png'), greedy).result;
    assert.deepEqual(tokenIds, want);
    assert.equal(c.restarts, 1);
  } finally {
    c.dispose();
  }
});

test('bad input is an error that says what: a missing image, a missing folder, threads', async () => {
  await assert.rejects(captioner.caption(join(root, 'no-such.png')).result, /no-such\.png/);
  await assert.rejects(Captioner.fromPretrained('./no/such/folder'), /no such folder/);
  await assert.rejects(Captioner.fromPretrained(MODEL, { threads: 2 }), /single-threaded/);
});

test('device: Node has no WebGPU, so auto runs on WASM and says why (dtype null), webgpu rejects saying why; neither traps; a bad dtype is refused', async () => {
  const auto = await Captioner.fromPretrained(MODEL, { device: 'auto', dtype: 'fp16' });
  assert.equal(auto.device, 'wasm');
  assert.equal(auto.adapter, null);
  assert.equal(auto.dtype, null, 'dtype is the GPU\'s storage: none on WASM');
  assert.match(auto.deviceFallback, /WebGPU unavailable \(.*no WebGPU here.*\): the model runs on WASM/);
  const ids = (await auto.caption(image('astronaut.png'), greedy).result).tokenIds;
  assert.deepEqual(ids, reference.images['astronaut.png'].greedy_ids);
  assert.equal(auto.restarts, 0, 'no trap');
  auto.dispose();
  await assert.rejects(Captioner.fromPretrained(MODEL, { device: 'webgpu' }), /device 'webgpu': .*no WebGPU here/);
  assert.equal(captioner.device, 'wasm', 'the default device');
  await assert.rejects(Captioner.fromPretrained(MODEL, { dtype: 'bf16' }), /dtype must be 'fp32' or 'fp16', not "bf16"/);
});

test('a hub id downloads into the hub cache under HF_HOME, which a later load reads without the network', async () => {
  const fixtures = join(root, 'tests/fixtures');
  const hub = await startHub({
    'tiny/vit-gpt2': { base: MODEL },
    'tiny/vit-gpt2-sharded': { base: MODEL, weights: join(fixtures, 'checkpoints/sharded-safetensors') },
  });
  const saved = env.remoteHost;
  env.remoteHost = hub.url;
  const want = reference.images['astronaut.png'].greedy_ids;
  try {
    for (const id of ['tiny/vit-gpt2', 'tiny/vit-gpt2-sharded']) {
      const files = new Set();
      const c = await Captioner.fromPretrained(id, { onProgress: (e) => e.file && files.add(e.file) });
      assert.deepEqual((await c.caption(image('astronaut.png'), greedy).result).tokenIds, want, id);
      c.dispose();
      assert.ok(files.has('config.json'), `${id}: progress names the files (${[...files]})`);
    }
    const repo = join(home, 'hub', 'models--tiny--vit-gpt2-sharded');
    const commit = readFileSync(join(repo, 'refs', 'main'), 'utf8');
    assert.equal(commit, commitOf('tiny/vit-gpt2-sharded'));
    assert.ok(lstatSync(join(repo, 'snapshots', commit, 'model-00001-of-00003.safetensors')).isSymbolicLink());
    assert.ok(existsSync(join(repo, '.no_exist', commit, 'tokenizer.json')), 'a missing file is remembered');
    const asked = hub.requests.map((r) => r.url);
    assert.ok(!asked.some((u) => /README|\.msgpack|\.h5/.test(u)), asked.join('\n'));
    await assert.rejects(Captioner.fromPretrained('tiny/nope'), /no such repository/);
  } finally {
    hub.server.close();
  }
  // The server is gone: the cache answers, and snapshotDownload gives the folder the CLI reads.
  env.remoteHost = 'http://127.0.0.1:9/';
  const c = await Captioner.fromPretrained('tiny/vit-gpt2');
  assert.deepEqual((await c.caption(image('astronaut.png'), greedy).result).tokenIds, want);
  c.dispose();
  assert.equal(await snapshotDownload('tiny/vit-gpt2'), join(home, 'hub', 'models--tiny--vit-gpt2', 'snapshots', commitOf('tiny/vit-gpt2')));
  env.remoteHost = saved;

  // One cache: the native CLI (built by `cargo test` before this suite) reads what Node fetched.
  const cli = join(process.env.CARGO_TARGET_DIR ?? join(root, 'target'), 'debug', 'caption');
  assert.ok(existsSync(cli), `${cli}: build it with cargo build --bin caption (./build.sh test does)`);
  const out = execFileSync(cli, ['--model', 'tiny/vit-gpt2-sharded', '--num-beams', '1', '--max-new-tokens', '20', '--json', image('astronaut.png')], {
    env: { ...process.env, HF_HOME: home, HF_HUB_OFFLINE: '1' },
  });
  assert.deepEqual(JSON.parse(out.toString().split('\n')[0]).token_ids, want);
});

test('the weights stream into WASM in chunks of at most env.maxPieceBytes, never one buffer, and caption the same', async () => {
  const { _loadFiles } = await import(join(root, 'pkg/index.js'));
  const { openAsBlob } = await import('node:fs');
  const saved = env.maxPieceBytes;
  env.maxPieceBytes = 4099;
  const want = reference.images['astronaut.png'].greedy_ids;
  try {
    const files = new Map();
    for (const f of readdirSync(MODEL)) files.set(f, await openAsBlob(join(MODEL, f)));
    const sent = [];
    const sink = {
      weights: async (name) => sent.push(['weights', name]),
      open: async (name) => sent.push(['open', name]),
      buffer: async (bytes) => new ArrayBuffer(bytes),
      release() {},
      push: async (name, chunk) => sent.push([name, chunk]),
    };
    const { files: loaded } = await _loadFiles(files, undefined, { cache: false }, sink);
    const whole = readFileSync(join(MODEL, 'model.safetensors'));
    assert.deepEqual(sent.slice(0, 2), [['weights', 'model.safetensors'], ['open', 'model.safetensors']]);
    const chunks = sent.slice(2).filter(([name]) => name === 'model.safetensors').map(([, c]) => c);
    assert.equal(chunks.length, Math.ceil(whole.length / 4099), `${chunks.length} chunks`);
    assert.ok(chunks.every((c) => c instanceof Uint8Array && c.byteLength <= 4099));
    assert.ok(Buffer.concat(chunks).equals(whole));
    assert.ok(!('weights' in loaded), 'the weights are streamed, not among the files handed over');
    // From a folder (Blob slices), and a sharded f16 .bin checkpoint from a hub.
    const c = await Captioner.fromPretrained(MODEL);
    assert.deepEqual((await c.caption(image('astronaut.png'), greedy).result).tokenIds, want);
    c.dispose();
    // The f16 shards as one pytorch_model.bin, read whole: the ids the pieces must give.
    env.maxPieceBytes = saved;
    const single = new Map(files);
    single.delete('model.safetensors');
    single.set('pytorch_model.bin', await openAsBlob(join(root, 'tests/fixtures/checkpoints/bin-f16/pytorch_model.bin')));
    const whole16 = await Captioner.fromPretrained(single);
    const want16 = (await whole16.caption(image('astronaut.png'), greedy).result).tokenIds;
    whole16.dispose();
    env.maxPieceBytes = 4099;
    const hub = await startHub({ 'tiny/vit-gpt2-bin-shards': { base: MODEL, weights: join(root, 'tests/fixtures/checkpoints/sharded-bin-f16') } });
    const remote = env.remoteHost;
    env.remoteHost = hub.url;
    try {
      // A hub id (its cached files sliced) and the same folder as a URL (bodies streamed).
      for (const source of ['tiny/vit-gpt2-bin-shards', `${hub.url}tiny/vit-gpt2-bin-shards/resolve/main/`]) {
        const f16 = await Captioner.fromPretrained(source);
        assert.deepEqual((await f16.caption(image('astronaut.png'), greedy).result).tokenIds, want16, source);
        f16.dispose();
      }
    } finally {
      env.remoteHost = remote;
      hub.server.close();
    }
  } finally {
    env.maxPieceBytes = saved;
  }
  env.maxPieceBytes = 0;
  await assert.rejects(Captioner.fromPretrained(MODEL), /maxPieceBytes/);
  env.maxPieceBytes = saved;
});

test('a download that drops halfway fails, leaves nothing corrupt in the cache, and the next load resumes it', async () => {
  const hub = await startHub({ 'tiny/vit-gpt2-drop': { base: MODEL, drop: ['model.safetensors'] } });
  const saved = env.remoteHost;
  env.remoteHost = hub.url;
  const repo = join(home, 'hub', 'models--tiny--vit-gpt2-drop');
  const commit = commitOf('tiny/vit-gpt2-drop');
  try {
    await assert.rejects(Captioner.fromPretrained('tiny/vit-gpt2-drop'), /model\.safetensors.*(dropped|got \d+ of \d+).*load again to resume/s);
    const blobs = readdirSync(join(repo, 'blobs'));
    const partial = blobs.filter((b) => b.endsWith('.incomplete'));
    assert.equal(partial.length, 1, blobs.join(', '));
    const size = statSync(join(repo, 'blobs', partial[0])).size;
    assert.ok(size > 0 && size < statSync(join(MODEL, 'model.safetensors')).size, `${size} bytes kept`);
    assert.ok(!existsSync(join(repo, 'snapshots', commit, 'model.safetensors')), 'no snapshot entry for a partial file');
    const c = await Captioner.fromPretrained('tiny/vit-gpt2-drop');
    assert.deepEqual((await c.caption(image('astronaut.png'), greedy).result).tokenIds, reference.images['astronaut.png'].greedy_ids);
    c.dispose();
    assert.ok(hub.requests.some((r) => r.range === `bytes=${size}-`), 'the second load asked for the rest only');
    assert.ok(!readdirSync(join(repo, 'blobs')).some((b) => b.endsWith('.incomplete')));
    assert.ok(readFileSync(join(repo, 'snapshots', commit, 'model.safetensors')).equals(readFileSync(join(MODEL, 'model.safetensors'))));
  } finally {
    env.remoteHost = saved;
    hub.server.close();
  }
});
