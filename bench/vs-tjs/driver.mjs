// Node half of the wasmcap-vs-transformers.js benchmark: serves the repo (www/serve.mjs, COOP/COEP)
// plus the model folder made by make_model.py, and for every dtype × threads × side starts a
// fresh headless Chromium (Debian's, as bench/browser.mjs does), runs page.js there, reads the
// renderer's peak RSS, and prints a markdown table.
//
//   node bench/vs-tjs/driver.mjs --data ~/.cache/wasmcap/vs-tjs [--tokens 20] [--repeats 3]
//        [--threads 1,2] [--dtypes fp32,q8] [--sides ours,theirs] [--ours-threads auto|always|never]
//        [--json out.json] [--ours-js js]
// --ours-js DIR: serve /pkg/index.js and /pkg/worker.js from DIR (e.g. js/, as build.sh's
// assemble step would copy them) — for a pkg/ whose wasm is current but whose shim is not.
import { chromium } from 'playwright-core';
import { createReadStream, existsSync, readFileSync, statSync, writeFileSync } from 'node:fs';
import { mkdtemp, readFile, rm, stat } from 'node:fs/promises';
import { execFileSync } from 'node:child_process';
import { tmpdir, homedir, loadavg } from 'node:os';
import { extname, join, normalize, resolve } from 'node:path';
import { parseArgs } from 'node:util';
import { startServer } from '../../www/serve.mjs';

const { values: opt } = parseArgs({
  options: {
    data: { type: 'string', default: join(homedir(), '.cache/wasmcap/vs-tjs') },
    tokens: { type: 'string', default: '20' },
    repeats: { type: 'string', default: '3' },
    threads: { type: 'string', default: '1,2' },
    dtypes: { type: 'string', default: 'fp32,q8' },
    sides: { type: 'string', default: 'ours,theirs' },
    'ours-threads': { type: 'string', default: 'auto' },
    json: { type: 'string' },
    'ours-js': { type: 'string' },
  },
});
const data = resolve(opt.data);
const tokens = Number(opt.tokens);
const repeats = Number(opt.repeats);
const threadList = opt.threads.split(',').map(Number);
const dtypes = opt.dtypes.split(',');
const sides = opt.sides.split(',');
if (!(tokens >= 2)) throw new Error('--tokens must be at least 2 (ms/token = (t(N) - t(1)) / (N - 1))');
if (!existsSync(join(data, 'model/.complete'))) throw new Error(`${data}/model is missing or incomplete: run bench/vs-tjs/make_model.py`);
const reference = JSON.parse(readFileSync(join(data, 'reference.json'), 'utf8'));
if (tokens > reference.tokenIds.length) throw new Error(`--tokens ${tokens}: make_model.py checked only ${reference.tokenIds.length} greedy tokens for EOS`);
// Our decoder quantization for the q8 rows: q8_0 (int8, a scale per 32 weights); theirs: ONNX
// Runtime dynamic quantization (per-tensor 8-bit weights, uint8 activations).
// q8: the folder the quantize binary wrote (run.sh), loaded as it is.
const OUR_MODEL = { fp32: 'model/', q8: 'model-q8/' };

const log = (...a) => console.error('[vs-tjs]', ...a);
const MODEL_PREFIX = '/vs-tjs-data/';
const types = { '.json': 'application/json', '.png': 'image/png', '.onnx': 'application/octet-stream', '.safetensors': 'application/octet-stream' };

// The model folder (outside the repo) under /vs-tjs-data/, streamed (the files are ~1 GB).
const oursJs = opt['ours-js'] ? resolve(opt['ours-js']) : null;
async function onRequest(req, res, headers) {
  const url = new URL(req.url, 'http://127.0.0.1');
  if (oursJs && (url.pathname === '/pkg/index.js' || url.pathname === '/pkg/worker.js')) {
    const body = await readFile(join(oursJs, url.pathname.slice('/pkg/'.length)));
    res.writeHead(200, { ...headers, 'Content-Type': 'text/javascript', 'Content-Length': body.length });
    res.end(body);
    return true;
  }
  if (!url.pathname.startsWith(MODEL_PREFIX)) return false;
  const path = normalize(join(data, decodeURIComponent(url.pathname.slice(MODEL_PREFIX.length))));
  let st;
  try {
    if (!path.startsWith(data + '/')) throw new Error('outside');
    st = await stat(path);
    if (!st.isFile()) throw new Error('not a file');
  } catch {
    res.writeHead(404, headers);
    res.end('not found');
    return true;
  }
  res.writeHead(200, { ...headers, 'Content-Type': types[extname(path)] ?? 'application/octet-stream', 'Content-Length': st.size });
  if (req.method === 'HEAD') res.end();
  // Read 1 MiB at a time: with 64 KiB reads this server, sharing the 2 cores, was the load's
  // bottleneck for both sides (a 957 MB fetch alone took 2.4–3.0 s; 1.5–1.8 s so).
  else createReadStream(path, { highWaterMark: 1 << 20 }).pipe(res);
  return true;
}

// Peak resident memory (VmHWM) of the renderer processes of the Chromium started with `profile`.
function rendererPeakBytes(profile) {
  const rows = execFileSync('ps', ['-eo', 'pid=,ppid=,args='], { encoding: 'utf8', maxBuffer: 1 << 24 })
    .split('\n').filter(Boolean).map((l) => {
      const m = l.trim().match(/^(\d+)\s+(\d+)\s+(.*)$/);
      return { pid: Number(m[1]), ppid: Number(m[2]), args: m[3] };
    });
  const roots = rows.filter((r) => r.args.includes(`--user-data-dir=${profile}`) && !r.args.includes('--type='));
  const tree = new Set(roots.map((r) => r.pid));
  for (let grew = true; grew;) {
    grew = false;
    for (const r of rows) if (tree.has(r.ppid) && !tree.has(r.pid)) { tree.add(r.pid); grew = true; }
  }
  let peak = 0;
  for (const r of rows) {
    if (!tree.has(r.pid) || !r.args.includes('--type=renderer')) continue;
    try {
      const kb = Number(readFileSync(`/proc/${r.pid}/status`, 'utf8').match(/VmHWM:\s+(\d+)/)[1]);
      peak = Math.max(peak, kb * 1024);
    } catch { /* exited */ }
  }
  return peak;
}

async function runOne(server, side, dtype, threads) {
  const base = `http://127.0.0.1:${server.address().port}`;
  const profile = await mkdtemp(join(tmpdir(), 'wasmcap-vs-tjs-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync'],
  });
  try {
    const page = await context.newPage();
    page.setDefaultTimeout(0);
    page.on('console', (m) => { if (m.type() === 'error' || m.type() === 'warning') process.stderr.write(`[page ${side}] ${m.text()}\n`); });
    page.on('pageerror', (e) => process.stderr.write(`[page ${side}] ${e}\n`));
    // The package may be rebuilt under us by another build: retry the page load a few times.
    for (let attempt = 1; ; attempt++) {
      try { await page.goto(`${base}/bench/vs-tjs/index.html`); break; } catch (e) { if (attempt >= 3) throw e; await new Promise((r) => setTimeout(r, 2000)); }
    }
    const args = side === 'ours'
      ? { modelUrl: `${MODEL_PREFIX}${OUR_MODEL[dtype]}`, imageUrl: `${MODEL_PREFIX}image.png`, tokens, repeats, threads, threadsOption: opt['ours-threads'] }
      : { modelRoot: MODEL_PREFIX, modelId: 'model', imageUrl: `${MODEL_PREFIX}image.png`, tokens, repeats, dtype, threads, ortDist: '/bench/vs-tjs/node_modules/onnxruntime-web/dist/' };
    const t = Date.now();
    const result = await page.evaluate(async ([side, args]) => (await import('/bench/vs-tjs/page.js'))[side](args), [side, args]);
    result.peakBytes = rendererPeakBytes(profile);
    result.wallS = (Date.now() - t) / 1000;
    return result;
  } finally {
    await context.close();
    await rm(profile, { recursive: true, force: true });
  }
}

const fmt = (x, d = 0) => (x === undefined || x === null || Number.isNaN(x) ? '–' : Number(x).toFixed(d));
const ratio = (a, b) => (a && b ? (a / b).toFixed(2) : '–');

const loadBefore = loadavg();
const server = await startServer(0, { onRequest });
const results = [];
try {
  for (const dtype of dtypes) {
    for (const threads of threadList) {
      for (const side of sides) {
        log(`${side} ${dtype} ${threads} thread(s)…`);
        const r = await runOne(server, side, dtype, threads);
        results.push({ side, dtype, threads, ...r });
        log(r.na ?? `${side} ${dtype} ×${threads}: load ${fmt(r.loadMs)} ms, encoder ${fmt(r.encoderMs)} ms, first ${fmt(r.firstTokenMs)} ms, ${fmt(r.msPerToken, 1)} ms/token, peak ${fmt(r.peakBytes / 2 ** 20)} MiB (${fmt(r.wallS)} s)`);
      }
    }
  }
} finally {
  server.close();
}
const loadAfter = loadavg();

const find = (side, dtype, threads) => results.find((r) => r.side === side && r.dtype === dtype && r.threads === threads && !r.na);
const anyRun = results.find((r) => r.userAgent);
const chromiumVersion = anyRun?.userAgent.match(/Chrome\/([\d.]+)/)?.[1] ?? '?';
const tjs = results.find((r) => r.version);
const lines = [];
lines.push(`wasmcap vs transformers.js ${tjs?.version ?? '?'} (onnxruntime-web ${tjs?.ortVersion ?? '?'}), headless Chromium ${chromiumVersion}, crossOriginIsolated: ${anyRun?.crossOriginIsolated}`);
const encoderName = JSON.parse(readFileSync(join(data, 'model/config.json'), 'utf8')).encoder.model_type === 'vit' ? 'ViT-B/16-224' : 'SigLIP-B/16-224';
lines.push(`${encoderName} + GPT-2 small (cross-attention), random weights; one 224×224 image; greedy, N = ${tokens} new tokens; median of ${repeats} after one warm-up; a fresh browser per row`);
lines.push(`first token ms = wall time of a max_new_tokens=1 call (image fetch + preprocessing + encoder + 1 step); ms/token = (t(N) − t(1)) / (N − 1); tokens/s = 1000 / ms/token`);
lines.push(`encoder ms: ours = wasmcap's timings.encoderMs (the image encoder; GPT-2's cross-attention keys/values count toward the first token); theirs = the encoder ONNX session run alone (cross-attention K/V come in its first decoder step). peak MiB = peak RSS (VmHWM) of the page's renderer process`);
const mb = (...files) => (files.reduce((n, f) => n + (existsSync(join(data, f)) ? statSync(join(data, f)).size : NaN), 0) / 1e6).toFixed(0);
lines.push(`q8: ours = model-q8/ from the quantize binary (q8_0 matrices — int8, a scale per 32 — for encoder and decoder, f16 token embeddings; the decoder runs q8_0, the encoder int8 with one scale per output, 7-bit inputs); theirs = *_quantized.onnx (ORT dynamic quantization, per-tensor 8-bit weights of encoder and decoder)`);
lines.push(`download: fp32 ours ${mb('model/model.safetensors')} MB, theirs ${mb('model/onnx/encoder_model.onnx', 'model/onnx/decoder_model_merged.onnx')} MB; q8 ours ${mb('model-q8/model.safetensors')} MB, theirs ${mb('model/onnx/encoder_model_quantized.onnx', 'model/onnx/decoder_model_merged_quantized.onnx')} MB`);
if (oursJs) lines.push(`wasmcap's JS shim served from ${oursJs} instead of pkg/`);
lines.push(`load average (1/5/15 min) before: ${loadBefore.map((x) => x.toFixed(2)).join(' ')}, after: ${loadAfter.map((x) => x.toFixed(2)).join(' ')}; cores: ${(await import('node:os')).cpus().length}`);
lines.push('');
lines.push('| dtype | threads | side | load ms | encoder ms | first token ms | ms/token | tokens/s | peak MiB |');
lines.push('|---|---|---|---|---|---|---|---|---|');
for (const r of results) {
  const name = r.side === 'ours' ? 'wasmcap' : 'transformers.js';
  if (r.na) { lines.push(`| ${r.dtype} | ${r.threads} | ${name} | ${r.na} | | | | | |`); continue; }
  lines.push(`| ${r.dtype} | ${r.threads} | ${name} | ${fmt(r.loadMs)} | ${fmt(r.encoderMs)} | ${fmt(r.firstTokenMs)} | ${fmt(r.msPerToken, 1)} | ${fmt(r.tokensPerS, 1)} | ${fmt(r.peakBytes / 2 ** 20)} |`);
}
lines.push('');
lines.push('Ratios (< 1 in the first three columns, > 1 in ms/token: ours is faster / smaller):');
lines.push('');
lines.push('| dtype | threads | load ours/theirs | encoder ours/theirs | first token ours/theirs | ms/token theirs/ours | peak MiB ours/theirs |');
lines.push('|---|---|---|---|---|---|---|');
for (const dtype of dtypes) {
  for (const threads of threadList) {
    const o = find('ours', dtype, threads), t = find('theirs', dtype, threads);
    if (!o || !t) { lines.push(`| ${dtype} | ${threads} | n/a | | | | |`); continue; }
    lines.push(`| ${dtype} | ${threads} | ${ratio(o.loadMs, t.loadMs)} | ${ratio(o.encoderMs, t.encoderMs)} | ${ratio(o.firstTokenMs, t.firstTokenMs)} | ${ratio(t.msPerToken, o.msPerToken)} | ${ratio(o.peakBytes, t.peakBytes)} |`);
  }
}
lines.push('');
// Token ids: fp32 must match each other (and PyTorch's); q8 is reported only.
const agree = (a, b) => {
  let prefix = 0;
  while (prefix < a.length && a[prefix] === b[prefix]) prefix++;
  return { prefix, same: a.filter((x, i) => x === b[i]).length, n: a.length };
};
const torchIds = reference.tokenIds.slice(0, tokens);
let failed = false;
for (const dtype of dtypes) {
  for (const threads of threadList) {
    const o = find('ours', dtype, threads), t = find('theirs', dtype, threads);
    const parts = [];
    if (o && t) {
      const a = agree(o.tokenIds, t.tokenIds);
      parts.push(`ours vs theirs ${a.same}/${a.n} same (common prefix ${a.prefix})`);
      if (dtype === 'fp32' && a.same !== a.n) failed = true;
    }
    for (const [name, r] of [['ours', o], ['theirs', t]]) {
      if (!r) continue;
      const a = agree(r.tokenIds, torchIds);
      parts.push(`${name} vs PyTorch ${a.same}/${a.n}`);
    }
    if (parts.length) lines.push(`token ids, ${dtype}, ${threads} thread(s): ${parts.join('; ')}${dtype === 'fp32' && o && t ? (agree(o.tokenIds, t.tokenIds).same === tokens ? ' — MATCH' : ' — MISMATCH') : ''}`);
  }
}
const f = find('ours', 'fp32', threadList[0]) ?? find('theirs', 'fp32', threadList[0]);
if (f) lines.push(`fp32 greedy ids: ${JSON.stringify(f.tokenIds)}`);
console.log(lines.join('\n'));
if (opt.json) writeFileSync(opt.json, JSON.stringify({ tokens, repeats, loadBefore, loadAfter, chromiumVersion, results }, null, 1) + '\n');
if (failed) {
  console.error('[vs-tjs] fp32 token ids differ between wasmcap and transformers.js');
  process.exit(1);
}
