// Browser half of `./build.sh bench`: loads pkg/ in headless Chromium (Debian's) and runs
// benchModel there. Prints one JSON line.
import { chromium } from 'playwright-core';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { readFileSync } from 'node:fs';
import { startServer } from '../www/serve.mjs';

// `node bench/browser.mjs memory BYTES REPEATS` prints the streaming-read GB/s instead;
// `node bench/browser.mjs gemm ROWS IN OUT REPEATS` one encoder GEMM, f32 and 8-bit.
const [configPath, promptTokens = '8', tokens = '20', repeats = '3', images = '1', beams = '1', weights = 'f32', tiles = '1'] = process.argv.slice(2);
const memoryMode = configPath === 'memory';
const gemmMode = configPath === 'gemm';
// THREADS=n: the threaded build (pkg/threads/) with a pool of n workers.
const threads = Number(process.env.THREADS ?? 1);
// THREADED_BUILD=1: pkg/threads/ even for one thread (what the threaded build costs by itself).
const threadedBuild = Boolean(process.env.THREADED_BUILD);
// RELAXED_SIMD=0: the encoder's simd128 GEMM kernel even where the browser has relaxed SIMD.
const relaxedSimd = process.env.RELAXED_SIMD !== '0';
const config = memoryMode || gemmMode ? '' : readFileSync(configPath, 'utf8');
const server = await startServer(0);
const profile = await mkdtemp(join(tmpdir(), 'wasmcap-bench-'));
const context = await chromium.launchPersistentContext(profile, {
  executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
  args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
try {
  const page = await context.newPage();
  page.on('console', (m) => process.stderr.write(`[page] ${m.text()}\n`));
  await page.goto(`http://127.0.0.1:${server.address().port}/bench/index.html`);
  // PROFILE=1: sample the run with the DevTools profiler and print the functions with the most
  // self time (wasm functions carry their Rust names) to stderr.
  const cdp = process.env.PROFILE ? await context.newCDPSession(page) : null;
  if (cdp) {
    await cdp.send('Profiler.enable');
    await cdp.send('Profiler.setSamplingInterval', { interval: 200 });
    await cdp.send('Profiler.start');
  }
  const result = await page.evaluate(async ([config, promptTokens, tokens, repeats, memoryMode, images, beams, weights, threads, threadedBuild, relaxedSimd, tiles, gemmMode, gemmShape]) => {
    const call = memoryMode ? 'benchMemory' : gemmMode ? 'benchGemm' : 'benchModel';
    const args = memoryMode ? [promptTokens, tokens] : gemmMode ? gemmShape : [config, promptTokens, tokens, repeats, images, beams, weights, tiles];
    let reply;
    if (threads > 1 || threadedBuild) {
      const worker = new Worker('/bench/worker.js', { type: 'module' });
      reply = await new Promise((ok) => { worker.onmessage = ({ data }) => ok(data); worker.postMessage({ threads, threadedBuild, relaxedSimd, call, args }); });
      worker.terminate();
    } else {
      // One thread runs on the page itself, where PROFILE=1's sampling profiler sees it.
      const wasm = await import('/pkg/wasmcap.js');
      await wasm.default();
      wasm.allowRelaxedSimd(relaxedSimd);
      try { reply = { result: wasm[call](...args) }; } catch (e) { reply = { error: String(e?.message ?? e) }; }
    }
    if (reply.error) throw new Error(reply.error);
    if (memoryMode) return reply.result;
    if (gemmMode) return { ...JSON.parse(reply.result), threads };
    return { ...reply.result, threads, userAgent: navigator.userAgent, crossOriginIsolated: self.crossOriginIsolated };
  }, [config, Number(promptTokens), Number(tokens), Number(repeats), memoryMode, Number(images), Number(beams), weights, threads, threadedBuild, relaxedSimd, Number(tiles), gemmMode,
    process.argv.slice(3, 7).map(Number)]);
  if (cdp) printProfile((await cdp.send('Profiler.stop')).profile);
  console.log(JSON.stringify(result));
} finally {
  await context.close();
  server.close();
  await rm(profile, { recursive: true, force: true });
}

function printProfile(profile) {
  const self = new Map();
  const byId = new Map(profile.nodes.map((n) => [n.id, n]));
  const dts = profile.timeDeltas;
  let total = 0;
  profile.samples.forEach((id, i) => {
    const n = byId.get(id);
    const name = n.callFrame.functionName || `(${n.callFrame.url.split('/').pop() || 'anonymous'})`;
    const dt = (dts[i + 1] ?? 0) / 1000;
    self.set(name, (self.get(name) ?? 0) + dt);
    total += dt;
  });
  // PROFILE_CALLERS=name: also the callers of the functions whose name contains it.
  const wanted = process.env.PROFILE_CALLERS;
  if (wanted) {
    const parent = new Map();
    for (const n of profile.nodes) for (const c of n.children ?? []) parent.set(c, n);
    const callers = new Map();
    profile.samples.forEach((id, i) => {
      const n = byId.get(id);
      if (!n.callFrame.functionName.includes(wanted)) return;
      // PROFILE_DEPTH=n: the chain of n callers.
      const chain = [];
      for (let p = parent.get(id), d = 0; p && d < Number(process.env.PROFILE_DEPTH ?? 1); p = parent.get(p.id), d++) chain.push(p.callFrame.functionName.replace(/::h[0-9a-f]{16}$/, ''));
      const p = chain.join(' < ') || '?';
      callers.set(p, (callers.get(p) ?? 0) + (dts[i + 1] ?? 0) / 1000);
    });
    for (const [name, ms] of [...callers].sort((a, b) => b[1] - a[1]).slice(0, 10)) process.stderr.write(`caller ${ms.toFixed(1).padStart(9)} ms  ${name.slice(0, 400)}\n`);
  }
  const top = [...self].sort((a, b) => b[1] - a[1]).slice(0, Number(process.env.PROFILE_TOP ?? 40));
  process.stderr.write(`profile: ${total.toFixed(0)} ms sampled\n`);
  for (const [name, ms] of top) process.stderr.write(`${ms.toFixed(1).padStart(9)} ms ${(100 * ms / total).toFixed(1).padStart(5)}%  ${name.slice(0, 140)}\n`);
}
