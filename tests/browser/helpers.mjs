// Shared by the page tests: Debian's Chromium through playwright-core (never a downloaded browser),
// the reference token ids, and the repo's static server.
import { chromium } from 'playwright-core';
import { execFileSync } from 'node:child_process';
import { mkdtemp, rm, mkdir } from 'node:fs/promises';
import { readFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';

export const root = fileURLToPath(new URL('../..', import.meta.url));
export const artifacts = join(root, 'target', 'artifacts');

export async function launch() {
  const profile = await mkdtemp(join(tmpdir(), 'wasmcap-test-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: process.env.CHROMIUM ?? '/usr/bin/chromium',
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
      '--disable-background-networking', '--disable-component-update', '--disable-sync',
      // WebGPU on SwiftShader, a software adapter: `device: 'webgpu'` runs without a GPU.
      '--enable-unsafe-webgpu', '--use-webgpu-adapter=swiftshader'],
  });
  await mkdir(artifacts, { recursive: true });
  return {
    context,
    async close() {
      await context.close();
      await rm(profile, { recursive: true, force: true });
    },
  };
}

export function watchPage(page, log) {
  page.on('console', (m) => log.push(`[console.${m.type()}] ${m.text()}`));
  page.on('pageerror', (e) => log.push(`[pageerror] ${e.message}`));
}

/** Prints what `watchPage` collected when a page threw, or always with WASMCAP_TEST_VERBOSE=1. */
export function printLog(log) {
  if (process.env.WASMCAP_TEST_VERBOSE || log.some((l) => l.startsWith('[pageerror]'))) console.error(log.join('\n'));
}

/** The fixture's reference (🤗 transformers) and the native CLI's ids for astronaut.png, 20 tokens. */
export function referenceIds() {
  const fixture = JSON.parse(readFileSync(join(root, 'tests/fixtures/reference/tiny-ved-v5.json'), 'utf8'));
  const args = ['--model', 'tests/fixtures/tiny-ved-v5', '--json', '--max-new-tokens', '20', 'tests/fixtures/images/astronaut.png'];
  const out = process.env.CAPTION_BIN
    ? execFileSync(process.env.CAPTION_BIN, args, { cwd: root, encoding: 'utf8' })
    : execFileSync('cargo', ['run', '-q', '--bin', 'caption', '--', ...args], { cwd: root, encoding: 'utf8' });
  const native = JSON.parse(out.trim().split('\n').at(-1));
  return { fixture: fixture.images['astronaut.png'].greedy_ids, native: native.token_ids, text: native.text };
}
