// Browser half of `./build.sh bench`: loads pkg/ in headless Chromium (Debian's) and runs
// benchModel there. Prints one JSON line.
import { chromium } from 'playwright-core';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { readFileSync } from 'node:fs';
import { startServer } from '../www/serve.mjs';

const [configPath, promptTokens = '8', tokens = '20', repeats = '3'] = process.argv.slice(2);
const config = readFileSync(configPath, 'utf8');
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
  const result = await page.evaluate(async ([config, promptTokens, tokens, repeats]) => {
    const wasm = await import('/pkg/wasmcap.js');
    await wasm.default();
    const r = wasm.benchModel(config, promptTokens, tokens, repeats);
    return { ...r, userAgent: navigator.userAgent, crossOriginIsolated: self.crossOriginIsolated };
  }, [config, Number(promptTokens), Number(tokens), Number(repeats)]);
  console.log(JSON.stringify(result));
} finally {
  await context.close();
  server.close();
  await rm(profile, { recursive: true, force: true });
}
