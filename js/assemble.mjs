// Called by build.sh after `wasm-pack build --target web --out-dir pkg`: turns pkg/ into the npm
// package — copies the shim, worker, types and README from js/, and replaces wasm-pack's
// package.json with js/package.json (version, license and repository taken from Cargo.toml via
// wasm-pack's).
import { copyFileSync, readFileSync, writeFileSync, rmSync } from 'node:fs';
import { fileURLToPath } from 'node:url';

const js = fileURLToPath(new URL('.', import.meta.url));
const pkg = fileURLToPath(new URL('../pkg/', import.meta.url));
const generated = JSON.parse(readFileSync(pkg + 'package.json', 'utf8'));
const template = JSON.parse(readFileSync(js + 'package.json', 'utf8'));
const out = { ...template, version: generated.version };
for (const key of ['license', 'repository']) if (generated[key]) out[key] = generated[key];
for (const f of ['index.js', 'index.d.ts', 'worker.js', 'README.md']) copyFileSync(js + f, pkg + f);
writeFileSync(pkg + 'package.json', JSON.stringify(out, null, 2) + '\n');
// wasm-pack's pkg/.gitignore ('*') would hide the files from `npm pack`'s fallback ignore rules.
rmSync(pkg + '.gitignore', { force: true });
for (const f of out.files) readFileSync(pkg + f); // fail here, not in npm pack, if one is missing
console.error(`pkg/: npm package ${out.name}@${out.version}`);
