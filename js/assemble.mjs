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
// fail here, not in npm pack, if one is missing
for (const f of out.files) if (!f.endsWith('/')) readFileSync(pkg + f);
for (const f of ['threads/wasmcap.js', 'threads/wasmcap_bg.wasm']) readFileSync(pkg + f);
console.error(`pkg/: npm package ${out.name}@${out.version}`);
