// Called by build.sh after `wasm-pack build --target web --out-dir pkg` and the threaded build
// (wasm-bindgen --out-dir pkg/threads): turns pkg/ into the npm
// package — copies the shim, worker, types and README from js/, and replaces wasm-pack's
// package.json with js/package.json (version, license and repository taken from Cargo.toml via
// wasm-pack's).
import { copyFileSync, readFileSync, readdirSync, writeFileSync, rmSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const js = fileURLToPath(new URL('.', import.meta.url));
const pkg = fileURLToPath(new URL('../pkg/', import.meta.url));
const generated = JSON.parse(readFileSync(pkg + 'package.json', 'utf8'));
const template = JSON.parse(readFileSync(js + 'package.json', 'utf8'));
const out = { ...template, version: generated.version };
for (const key of ['license', 'repository']) if (generated[key]) out[key] = generated[key];
for (const f of ['index.js', 'index.d.ts', 'worker.js', 'node.js', 'node-worker.js', 'README.md']) copyFileSync(js + f, pkg + f);
writeFileSync(pkg + 'package.json', JSON.stringify(out, null, 2) + '\n');
// wasm-pack's pkg/.gitignore ('*') would hide the files from `npm pack`'s fallback ignore rules.
rmSync(pkg + '.gitignore', { force: true });
// wasm-bindgen-rayon's worker helper imports its main module dynamically as '../../..' (a
// directory, which only bundlers resolve, and a dynamic import, which makes Vite split the pool's
// worker — refused by its default worker format): import the file statically instead (a cycle
// with the glue, harmless: the module is used only once a message arrives).
const snippets = pkg + 'threads/snippets/';
const helpers = readdirSync(snippets, { recursive: true }).filter((f) => f.endsWith('workerHelpers.js'));
if (helpers.length !== 1) throw new Error(`expected one wasm-bindgen-rayon workerHelpers.js under ${snippets}, found ${helpers.length}`);
const helper = snippets + helpers[0];
const source = readFileSync(helper, 'utf8');
if (!source.includes("import('../../..')")) throw new Error(`${helper}: the main-module import changed; update js/assemble.mjs`);
writeFileSync(helper, "import * as mainModule from '../../../wasmcap.js';\n" + source.replace("import('../../..')", 'Promise.resolve(mainModule)'));
// The name section (function names for stack traces, 0.6 MB of 7.5) is not what a page should
// download before its first caption: a panic still reports its message. KEEP_NAMES=1 keeps it,
// for bench/browser.mjs's PROFILE=1 (Rust names instead of wasm-function[N]).
if (!process.env.KEEP_NAMES) for (const f of ['wasmcap_bg.wasm', 'threads/wasmcap_bg.wasm']) writeFileSync(pkg + f, withoutNameSection(readFileSync(pkg + f)));
// fail here, not in npm pack, if one is missing
for (const f of out.files) if (!f.endsWith('/')) readFileSync(pkg + f);
for (const f of ['threads/wasmcap.js', 'threads/wasmcap_bg.wasm']) readFileSync(pkg + f);
console.error(`pkg/: npm package ${out.name}@${out.version}`);

/** `wasm` without its custom section "name"; every other section as it was. */
function withoutNameSection(wasm) {
  const uleb = (at) => {
    let value = 0, shift = 0, byte;
    do {
      byte = wasm[at.pos++];
      value += (byte & 0x7f) * 2 ** shift;
      shift += 7;
    } while (byte & 0x80);
    return value;
  };
  const kept = [wasm.subarray(0, 8)];
  const at = { pos: 8 };
  while (at.pos < wasm.length) {
    const start = at.pos;
    const id = wasm[at.pos++];
    const size = uleb(at);
    const end = at.pos + size;
    if (end > wasm.length) throw new Error(`a section runs past the end of the .wasm (${end} > ${wasm.length})`);
    let name = null;
    if (id === 0) {
      const len = uleb(at);
      name = wasm.subarray(at.pos, at.pos + len).toString('utf8');
    }
    if (name !== 'name') kept.push(wasm.subarray(start, end));
    at.pos = end;
  }
  return Buffer.concat(kept);
}
