// The npm package as a web developer gets it: `npm pack` pkg/, install the tarball into a fresh
// Vite 7 app, `vite build`, and caption the sample in headless Chromium with the README's five
// lines. vite comes from the npm registry through npm's own cache (--prefer-offline), so only
// the first run on a machine downloads it.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { cpSync, mkdirSync, mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { createServer } from 'node:http';
import { tmpdir } from 'node:os';
import { extname, join, normalize } from 'node:path';
import { launch, watchPage, printLog, referenceIds, root, artifacts } from './helpers.mjs';

const VITE = process.env.WASMCAP_VITE ?? 'vite@7';
const TYPESCRIPT = process.env.WASMCAP_TYPESCRIPT ?? 'typescript@5';
let dir, browser, server, ref;
const log = [];
const npm = (args, cwd) => execFileSync('npm', [...args, '--no-audit', '--no-fund', '--loglevel=error'], { cwd, encoding: 'utf8' });

before(() => {
  ref = referenceIds();
  dir = mkdtempSync(join(tmpdir(), 'wasmcap-vite-'));
});

after(async () => {
  printLog(log);
  await browser?.close();
  server?.close();
  if (dir) rmSync(dir, { recursive: true, force: true });
});

test('npm pack: the tarball holds the shim, worker, types, wasm and README', () => {
  const out = JSON.parse(npm(['pack', '--json', '--pack-destination', dir], join(root, 'pkg')));
  const files = out[0].files.map((f) => f.path).sort();
  for (const f of ['index.js', 'index.d.ts', 'worker.js', 'node.js', 'node-worker.js', 'wasmcap.js', 'wasmcap_bg.wasm', 'README.md', 'package.json']) {
    assert.ok(files.includes(f), `${f} in ${files}`);
  }
  const pkg = JSON.parse(readFileSync(join(root, 'pkg/package.json'), 'utf8'));
  assert.equal(pkg.type, 'module');
  assert.equal(pkg.exports['.'].types, './index.d.ts');
  assert.equal(pkg.exports['.'].default, './index.js');
});

test('a fresh Vite 7 app installs the tarball, type-checks against its .d.ts, builds, and captions in Chromium (threaded build: the page is isolated)', async () => {
  const app = join(dir, 'app');
  mkdirSync(join(app, 'public'), { recursive: true });
  writeFileSync(join(app, 'package.json'), JSON.stringify({ name: 'wasmcap-vite-app', private: true, type: 'module' }));
  const tarball = readdirSync(dir).find((f) => f.endsWith('.tgz'));
  npm(['install', '--prefer-offline', '--save-dev', VITE, TYPESCRIPT], app);
  npm(['install', '--prefer-offline', join(dir, tarball)], app);
  cpSync(join(root, 'tests/fixtures/tiny-ved-v5'), join(app, 'public/model'), { recursive: true, dereference: true });
  cpSync(join(root, 'tests/fixtures/images/astronaut.png'), join(app, 'public/astronaut.png'));
  writeFileSync(join(app, 'index.html'), '<!doctype html><link rel="icon" href="data:,"><p id="out"></p><script type="module" src="/main.js"></script>\n');
  // The README's five lines; a failure is written where the test can see it.
  writeFileSync(join(app, 'main.js'), `import { Captioner } from 'wasmcap';
try {
  const captioner = await Captioner.fromPretrained('/model/');
  const run = captioner.caption('/astronaut.png', { maxNewTokens: 20 });
  for await (const t of run) document.getElementById('out').textContent = t.text;
  document.body.dataset.ids = JSON.stringify((await run.result).tokenIds);
  document.body.dataset.threads = String(captioner.threads);
} catch (e) {
  document.body.dataset.error = String(e.message ?? e);
}
`);
  // The .d.ts describes the public API: a strict TypeScript use of it type-checks.
  writeFileSync(join(app, 'check.ts'), `import { Captioner, clearCache, type CaptionResult, type ProgressEvent, type TokenEvent } from 'wasmcap';
export async function use(img: HTMLImageElement, signal: AbortSignal): Promise<CaptionResult> {
  const seen: ProgressEvent[] = [];
  const c = await Captioner.fromPretrained('/model/', { onProgress: (e) => seen.push(e), cache: 'reload', signal });
  const run = c.caption(img, { maxNewTokens: 20, signal });
  for await (const t of run) { const x: TokenEvent = t; console.log(x.id, x.text, x.delta); }
  const r = await run.result;
  const ms: number = r.timings.encoderMs + r.timings.firstTokenMs + r.timings.tokensPerS;
  await Captioner.fromPretrained({ 'config.json': new Blob([]) });
  await clearCache();
  c.dispose();
  return ms > 0 ? r : r;
}
`);
  writeFileSync(join(app, 'tsconfig.json'), JSON.stringify({
    compilerOptions: { strict: true, noEmit: true, target: 'es2022', module: 'esnext', moduleResolution: 'bundler', lib: ['es2022', 'dom', 'dom.iterable'], skipLibCheck: false },
    files: ['check.ts'],
  }));
  execFileSync(join(app, 'node_modules/.bin/tsc'), ['-p', '.'], { cwd: app, encoding: 'utf8' });
  execFileSync(join(app, 'node_modules/.bin/vite'), ['build', '--logLevel', 'warn'], { cwd: app, encoding: 'utf8' });
  const dist = join(app, 'dist');
  const assets = readdirSync(join(dist, 'assets'));
  assert.ok(assets.some((f) => f.endsWith('.wasm')), `the wasm is emitted: ${assets}`);
  assert.ok(assets.some((f) => /worker/i.test(f)), `the worker is emitted: ${assets}`);

  const types = { '.html': 'text/html', '.js': 'text/javascript', '.wasm': 'application/wasm', '.json': 'application/json', '.png': 'image/png' };
  server = createServer((req, res) => {
    const path = normalize(join(dist, new URL(req.url, 'http://x').pathname.replace(/\/$/, '/index.html')));
    try {
      if (!path.startsWith(dist)) throw new Error('outside');
      const body = readFileSync(path);
      // Isolated (COOP/COEP), so the bundled app takes the threaded build and its pool's workers.
      res.writeHead(200, {
        'Content-Type': types[extname(path)] ?? 'application/octet-stream',
        'Cross-Origin-Opener-Policy': 'same-origin',
        'Cross-Origin-Embedder-Policy': 'require-corp',
      });
      res.end(body);
    } catch {
      res.writeHead(404);
      res.end();
    }
  });
  await new Promise((ok) => server.listen(0, '127.0.0.1', ok));
  browser = await launch();
  const page = await browser.context.newPage();
  watchPage(page, log);
  await page.goto(`http://127.0.0.1:${server.address().port}/`);
  await page.waitForFunction(() => document.body.dataset.ids || document.body.dataset.error, null, { timeout: 60_000 });
  const error = await page.evaluate(() => document.body.dataset.error);
  assert.equal(error, undefined, error);
  assert.deepEqual(JSON.parse(await page.evaluate(() => document.body.dataset.ids)), ref.native);
  const cores = await page.evaluate(() => navigator.hardwareConcurrency);
  assert.equal(Number(await page.evaluate(() => document.body.dataset.threads)), Math.min(8, cores), 'the bundle ran the threaded build');
  assert.equal((await page.locator('#out').textContent()).trim(), ref.text.trim());
  await page.screenshot({ path: join(artifacts, 'vite-app.png') });
});
