// The demo page: drives the npm package's API (pkg/index.js, built by ./build.sh) like any user would.
import { Captioner } from '../pkg/index.js';

// The embedded models: trained by `bin/train` on the built-in shapes data (models/README.md).
// `?model=PATH` picks another folder as the default (the page tests use the random fixture,
// whose long captions exercise streaming and stopping).
const EMBEDDED = {
  default: new URL(new URLSearchParams(location.search).get('model') ?? '../models/shapes-cross-attention/', import.meta.url),
  prefix: new URL('../models/shapes-prefix/', import.meta.url),
};
const DEFAULT_MODEL = EMBEDDED.default;
const $ = (id) => document.getElementById(id);
const demo = { Captioner, captioner: null, loads: 0 };
window.wasmcapDemo = demo; // for the page tests (tests/browser/)

let loadController = null;
let captionController = null;
let previewUrl = null;

function setState(state) { document.body.dataset.state = state; }
function showError(e) {
  $('error').textContent = String(e?.message ?? e);
  setState('error');
}
function clearError() { $('error').textContent = ''; }
const mb = (n) => (n / 1e6).toFixed(n < 1e6 ? 2 : 1);

function modelSource() {
  const choice = document.querySelector('input[name=model]:checked').value;
  if (choice in EMBEDDED) return EMBEDDED[choice].href;
  if (choice === 'files') {
    const files = $('model-files').files;
    if (!files.length) throw new Error('Pick the model folder\'s files (config.json, model.safetensors, tokenizer.json, preprocessor_config.json).');
    return files;
  }
  const url = $('model-url').value.trim();
  if (!url) throw new Error('Enter the URL of a model folder, or choose the embedded default.');
  return url;
}

async function load() {
  loadController?.abort();
  const controller = (loadController = new AbortController());
  clearError();
  setState('loading');
  $('status').textContent = 'loading…';
  $('progress').value = 0;
  $('progress-text').textContent = '';
  $('load').disabled = true;
  try {
    const source = modelSource();
    const progress = [];
    demo.progress = progress;
    const captioner = await Captioner.fromPretrained(source, {
      device: $('device').value,
      signal: controller.signal,
      onProgress: (e) => {
        progress.push(e);
        $('progress').value = e.fraction;
        $('progress-text').textContent = e.done
          ? `${mb(e.total)} MB loaded — starting the model…`
          : `${e.file}${e.cached ? ' (cache)' : ''}: ${mb(e.fileLoaded)} / ${mb(e.fileTotal)} MB · total ${(100 * e.fraction).toFixed(0)} %`;
      },
    });
    demo.captioner?.dispose();
    demo.captioner = captioner;
    demo.loads++;
    const cached = progress.filter((e) => e.file && e.fileDone).every((e) => e.cached);
    const name = typeof source === 'string' ? source : `${source.length} local files`;
    const where = captioner.device === 'webgpu' ? `WebGPU (${captioner.adapter})` : `WASM${captioner.deviceFallback ? ` — ${captioner.deviceFallback}` : ''}`;
    $('status').textContent = `ready — ${name}${cached ? ' (from the cache)' : ''} · runs on ${where}`;
    $('progress-text').textContent = `${mb(progress.at(-1)?.total ?? 0)} MB${cached ? ' from the Cache API' : ''}`;
    setState('ready');
  } catch (e) {
    if (e.name === 'AbortError') return;
    $('status').textContent = demo.captioner ? 'the previous model is still loaded' : 'no model loaded';
    $('progress-text').textContent = 'loading failed';
    showError(e);
  } finally {
    if (loadController === controller) $('load').disabled = false;
  }
}

async function caption(image, previewSrc) {
  if (!demo.captioner) return showError('Load a model first.');
  captionController?.abort();
  const controller = (captionController = new AbortController());
  clearError();
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = previewSrc.startsWith('blob:') ? previewSrc : null;
  $('preview').src = previewSrc;
  $('caption').textContent = '';
  $('timings').textContent = '';
  $('stop').disabled = false;
  setState('captioning');
  const ids = [];
  $('caption').dataset.tokenIds = '[]';
  try {
    const prompt = $('prompt').value.trim() || undefined;
    // A split SmolVLM image goes through the encoder tile by tile: say how far it got.
    const onEncode = ({ encoded, tiles }) => { if (tiles > 1) $('timings').textContent = `encoding tile ${encoded} of ${tiles}…`; };
    const run = demo.captioner.caption(image, { maxNewTokens: Number($('max-tokens').value) || 20, prompt, onEncode, signal: controller.signal });
    for await (const t of run) {
      ids.push(t.id);
      $('caption').textContent = t.text;
      $('caption').dataset.tokenIds = JSON.stringify(ids);
    }
    const { text, tokenIds, timings: t } = await run.result;
    $('caption').textContent = text;
    $('caption').dataset.resultIds = JSON.stringify(tokenIds);
    $('timings').textContent = `encoder ${t.encoderMs.toFixed(0)} ms · first token ${t.firstTokenMs.toFixed(0)} ms · ` +
      `${t.tokensPerS.toFixed(1)} tokens/s · ${tokenIds.length} tokens`;
    // The last caption's timings on each device this page has used, side by side.
    demo.timingsByDevice = { ...demo.timingsByDevice, [demo.captioner.device]: $('timings').textContent };
    $('device-timings').textContent = Object.entries(demo.timingsByDevice).map(([d, text]) => `${d}: ${text}`).join(' | ');
    setState('done');
  } catch (e) {
    if (e.name === 'AbortError') {
      if (captionController === controller) {
        $('timings').textContent = `stopped after ${ids.length} tokens`;
        setState('aborted');
      }
    } else showError(e);
  } finally {
    if (captionController === controller) $('stop').disabled = true;
  }
}

$('default-model').textContent = DEFAULT_MODEL.pathname;
$('load').onclick = load;
$('device').onchange = load;
$('model-url').onfocus = () => { document.querySelector('input[name=model][value=url]').checked = true; };
$('model-url').onkeydown = (e) => { if (e.key === 'Enter') load(); };
$('model-files').onchange = () => { document.querySelector('input[name=model][value=files]').checked = true; load(); };
$('clear-cache').onclick = async () => {
  await Captioner.clearCache();
  $('progress-text').textContent = 'cache cleared';
};
$('stop').onclick = () => captionController?.abort();
for (const b of document.querySelectorAll('.sample')) {
  const src = new URL(b.dataset.src, location.href).href;
  b.onclick = () => caption(src, src);
}
$('file').onchange = (e) => {
  const f = e.target.files[0];
  if (f) caption(f, URL.createObjectURL(f));
  e.target.value = '';
};
const drop = $('drop');
drop.ondragover = (e) => { e.preventDefault(); drop.classList.add('over'); };
drop.ondragleave = () => drop.classList.remove('over');
drop.ondrop = (e) => {
  e.preventDefault();
  drop.classList.remove('over');
  const f = [...e.dataTransfer.files].find((x) => x.type.startsWith('image/')) ?? e.dataTransfer.files[0];
  if (f) caption(f, URL.createObjectURL(f));
};

demo.ready = load();
