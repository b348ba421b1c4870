// Minimal demo: fetch the model folder's files, build the captioner, stream a caption.
// The JS package with a Web Worker, caching and progress is www/'s next step (issue 4).
import init, { WasmCaptioner } from '../pkg/wasmcap.js';

const DEFAULT_MODEL = new URL('../tests/fixtures/tiny-ved-v5/', import.meta.url);
const SAMPLE = new URL('../tests/fixtures/images/astronaut.png', import.meta.url);
const $ = (id) => document.getElementById(id);

async function fetchBytes(base, name, optional = false) {
  const res = await fetch(new URL(name, base));
  if (!res.ok) {
    if (optional) return undefined;
    throw new Error(`${name}: HTTP ${res.status} from ${res.url}`);
  }
  return new Uint8Array(await res.arrayBuffer());
}

async function load(base) {
  await init();
  const [config, weights, tokenizer, preprocessor, generation] = await Promise.all([
    fetchBytes(base, 'config.json'), fetchBytes(base, 'model.safetensors'), fetchBytes(base, 'tokenizer.json'),
    fetchBytes(base, 'preprocessor_config.json'), fetchBytes(base, 'generation_config.json', true),
  ]);
  return new WasmCaptioner(config, weights, tokenizer, preprocessor, generation);
}

async function caption(captioner, bytes) {
  $('caption').textContent = '';
  $('caption').classList.remove('error');
  $('preview').src = URL.createObjectURL(new Blob([bytes]));
  try {
    captioner.start(bytes, { maxNewTokens: 20 });
    const ids = [];
    for (let t; (t = captioner.nextToken()) !== undefined;) {
      ids.push(t.id);
      $('caption').textContent = t.text;
      await new Promise((r) => setTimeout(r));          // let the page paint each token
    }
    const result = captioner.finish();
    $('caption').dataset.tokenIds = JSON.stringify(result.tokenIds);
    const t = result.timings;
    $('timings').textContent = `encoder ${t.encoderMs.toFixed(0)} ms · first token ${t.firstTokenMs.toFixed(0)} ms · ${t.tokensPerS.toFixed(1)} tokens/s`;
  } catch (e) {
    $('caption').textContent = String(e.message ?? e);
    $('caption').classList.add('error');
  }
}

try {
  $('model').textContent = DEFAULT_MODEL.pathname;
  const captioner = await load(DEFAULT_MODEL);
  $('status').textContent = 'ready';
  $('sample').onclick = async () => caption(captioner, await fetchBytes(SAMPLE, ''));
  $('file').onchange = async (e) => {
    const f = e.target.files[0];
    if (f) await caption(captioner, new Uint8Array(await f.arrayBuffer()));
  };
} catch (e) {
  $('status').textContent = `error: ${e.message ?? e}`;
  $('status').classList.add('error');
}
