// wasmcap's module Web Worker: owns the WASM instance and the WasmCaptioner. It only converts
// messages to calls of the wasm-bindgen API (src/wasm.rs) and back; no model logic lives here.
//
// main → worker: { type: 'weights', name, threads, threadStartMs } (starts the WASM build and a
//                  WasmWeights), { type: 'open', file, size }, { type: 'chunk', file, chunk }*
//                  → { type: 'consumed', buffer } per chunk (its buffer back, once the bytes are in WASM
//                    memory) | { type: 'error' }
//                { type: 'load', files, quantize, device } (the small files; the weights were streamed)
//                  → { type: 'loaded', defaults, threads, memoryBytes, threadsFallback, device, adapter?, deviceFallback? } | { type: 'error' }
//                { type: 'caption', run, image, options }
//                  → { type: 'token', run, token }* (beam: provisional best hypotheses, then the
//                    final one), then { type: 'done', run, result, memoryBytes } | { type: 'error', run, message }
//                    | { type: 'aborted', run }
//                { type: 'captionMany', run, images, options }
//                  → { type: 'token', run, token: { index, ... } }*, then 'done' (result: an array) | …
//                { type: 'abort', run }
//                { type: 'trapForTesting', run }  → { type: 'error', run, trapped: true } (tests only)
// An error with `trapped: true` means the WASM instance trapped (a bug, a failed memory grow):
// it is unusable, every later call here fails alike, and the shim replaces this worker.
// dispose() terminates the worker, which drops the WASM instance and all its memory.
// The build is chosen at load: threads/ (wasm threads: shared memory, a rayon pool of Web
// Workers) when more than one thread is asked and this worker is crossOriginIsolated, else the
// single-threaded build. Both glue modules are imported statically (they do nothing until
// initialised; a dynamic import would make bundlers split this worker, which Vite's default
// worker format refuses) and both wasm URLs are literal, so bundlers emit both.
import * as single from './wasmcap.js';
import * as threaded from './threads/wasmcap.js';

let wasm = null;
async function startWasm(threads, threadStartMs = 20000) {
  if (wasm) return wasm;
  let fallback;
  if (threads > 1) {
    if (!self.crossOriginIsolated) {
      throw new Error(`${threads} threads need a crossOriginIsolated page (serve it with Cross-Origin-Opener-Policy: same-origin and Cross-Origin-Embedder-Policy: require-corp), or pass threads: 1`);
    }
    // The pool's workers never report in when their script is refused (e.g. served without the
    // COEP header): after threadStartMs the single-threaded build runs instead.
    let timer;
    const late = new Promise((_, fail) => { timer = setTimeout(() => fail(new Error('late')), threadStartMs); });
    try {
      await Promise.race([(async () => {
        await threaded.default({ module_or_path: new URL('./threads/wasmcap_bg.wasm', import.meta.url) });
        await threaded.initThreadPool(threads);
      })(), late]);
      threaded.setThreads(threads);
      wasm = { mod: threaded, threads };
      return wasm;
    } catch (e) {
      if (e.message !== 'late') throw e;
      fallback = `the thread pool did not start within ${threadStartMs} ms (are the worker scripts served with Cross-Origin-Embedder-Policy: require-corp?); running on 1 thread`;
    } finally {
      clearTimeout(timer);
    }
  }
  // Node.js cannot fetch a file: URL; its worker (node-worker.js) hands the bytes over.
  await single.default({ module_or_path: globalThis.wasmcapModuleBytes ?? new URL('./wasmcap_bg.wasm', import.meta.url) });
  wasm = { mod: single, threads: 1, fallback };
  return wasm;
}
let captioner = null;
let aborted = new Set();
let busy = Promise.resolve();

// A macrotask boundary without setTimeout's clamping, so abort messages are seen between tokens.
const channel = new MessageChannel();
const waiters = [];
channel.port1.onmessage = () => waiters.shift()?.();
const yieldToEvents = () => new Promise((resolve) => { waiters.push(resolve); channel.port2.postMessage(0); });

const message = (e) => String(e?.message ?? e);

// A trap leaves the instance in an unknown state (a panic mid-call, memory half-grown): never
// call into it again.
let trap = null;
function failed(run, e) {
  if (e instanceof WebAssembly.RuntimeError) trap ??= message(e);
  postMessage({ type: 'error', run, message: trap ?? message(e), trapped: trap !== null });
}

async function pixelsOf(image) {
  if (image.kind === 'bytes' || image.kind === 'rgba') return image;
  let bitmap = image.bitmap;
  if (image.kind === 'blob') {
    try {
      bitmap = await createImageBitmap(image.blob, { colorSpaceConversion: 'none' });
    } catch (e) {
      const head = Array.from(new Uint8Array(await image.blob.slice(0, 8).arrayBuffer()), (b) => b.toString(16).padStart(2, '0')).join(' ');
      throw new Error(`could not decode the image: not a PNG or JPEG, and the browser cannot decode it either (${message(e)}; first bytes ${head})`);
    }
  }
  try {
    const canvas = new OffscreenCanvas(bitmap.width, bitmap.height);
    const ctx = canvas.getContext('2d', { willReadFrequently: true });
    ctx.drawImage(bitmap, 0, 0);
    const data = ctx.getImageData(0, 0, bitmap.width, bitmap.height).data;
    return { kind: 'rgba', data, width: bitmap.width, height: bitmap.height };
  } finally {
    bitmap.close();
  }
}

// The WASM API's image argument: PNG/JPEG bytes, or RGBA { data, width, height }.
function wasmImage(pixels) {
  if (pixels.kind === 'bytes') return new Uint8Array(pixels.data);
  const { data } = pixels;
  return { data: new Uint8Array(data.buffer, data.byteOffset, data.byteLength), width: pixels.width, height: pixels.height };
}

// The image through the encoder a batch of tiles at a time (as many as there are threads), with
// progress after each batch and a chance to abort between them; false when aborted.
async function encodeTiles(run, pixels, options) {
  if (pixels.kind === 'bytes') captioner.startEncoding(new Uint8Array(pixels.data), options);
  else {
    const { data } = pixels;
    captioner.startEncodingRgba(new Uint8Array(data.buffer, data.byteOffset, data.byteLength), pixels.width, pixels.height, options);
  }
  for (;;) {
    // The GPU takes every tile in one batch; the CPU as many as there are threads.
    const progress = device === 'webgpu' ? await captioner.encodeStepAsync(64) : captioner.encodeStep(wasm?.threads ?? 1);
    postMessage({ type: 'encode', run, progress });
    if (progress.encoded >= progress.tiles) return true;
    await yieldToEvents();
    if (aborted.has(run)) {
      captioner.abort();
      postMessage({ type: 'aborted', run });
      return false;
    }
  }
}

// Beam search after the encoder is one call (no abort point inside; the best running hypothesis
// after each step comes out as a provisional token event). On WebGPU each step awaits the GPU.
async function beamSearch({ run, options, t0 }) {
  const provisional = (token) => postMessage({ type: 'token', run, token });
  const sequences =
    device === 'webgpu' ? await captioner.beamSearchEncodedAsync(options, provisional) : captioner.beamSearchEncoded(options, provisional);
  const best = sequences[0];
  postMessage({ type: 'token', run, token: { provisional: false, text: best.text, tokenIds: best.tokenIds } });
  postMessage({
    type: 'done', run, memoryBytes: wasm.mod.memoryBytes(),
    result: { text: best.text, tokenIds: best.tokenIds, score: best.score, sequences, timings: { totalMs: performance.now() - t0 } },
  });
}

async function caption({ run, image, options }) {
  try {
    if (trap) throw new Error(trap);
    if (!captioner) throw new Error('no model loaded');
    // Rust decides, as generate() does (src/generation.rs); invalid options throw here.
    const beam = captioner.usesBeamSearch(options);
    const pixels = await pixelsOf(image);
    if (aborted.has(run)) return postMessage({ type: 'aborted', run });
    const t0 = performance.now();
    if (!(await encodeTiles(run, pixels, options))) return;
    if (beam) return await beamSearch({ run, options, t0 });
    for (;;) {
      await yieldToEvents();
      if (aborted.has(run)) {
        captioner.abort();
        return postMessage({ type: 'aborted', run });
      }
      const token = device === 'webgpu' ? await captioner.nextTokenAsync() : captioner.nextToken();
      if (token === undefined) break;
      postMessage({ type: 'token', run, token });
    }
    const result = captioner.finish();
    captioner.abort(); // drop the run's state (KV cache) now that the result is out
    postMessage({ type: 'done', run, result, memoryBytes: wasm.mod.memoryBytes() });
  } catch (e) {
    failed(run, e);
  } finally {
    aborted.delete(run);
  }
}

// A batch is one call into WASM: encoder over all images, then decoded together.
async function captionMany({ run, images, options }) {
  try {
    if (trap) throw new Error(trap);
    if (!captioner) throw new Error('no model loaded');
    const inputs = [];
    for (const image of images) inputs.push(wasmImage(await pixelsOf(image)));
    if (aborted.has(run)) return postMessage({ type: 'aborted', run });
    const t0 = performance.now();
    const onToken = (index, token) => postMessage({ type: 'token', run, token: { index, ...token } });
    // On WebGPU the batch awaits the GPU's reads: encoded and decoded there too.
    const results = device === 'webgpu' ? await captioner.captionManyAsync(inputs, options, onToken) : captioner.captionMany(inputs, options, onToken);
    const totalMs = performance.now() - t0;
    for (const r of results) r.timings ??= { totalMs };
    postMessage({ type: 'done', run, result: results, memoryBytes: wasm.mod.memoryBytes() });
  } catch (e) {
    failed(run, e);
  } finally {
    aborted.delete(run);
  }
}

// The weights as they stream in, and the loading messages in the order they came (starting
// the WASM build is asynchronous).
let weights = null;
let refused = null;
let loading = Promise.resolve();

// The device the encoder side runs on: 'webgpu' (an adapter found, the weights uploaded) or
// 'wasm'; 'auto' falls back to WASM with the reason, 'webgpu' rejects.
async function chooseDevice(device, dtype) {
  if (device === 'wasm') return { device: 'wasm' };
  let why;
  if (typeof captioner.useGpu !== 'function') why = 'this build of wasmcap has no WebGPU backend';
  else {
    try {
      const used = await captioner.useGpu(dtype);
      return { device: 'webgpu', adapter: used.adapter, dtype: used.dtype };
    } catch (e) {
      why = message(e);
    }
  }
  if (device === 'webgpu') throw new Error(`device 'webgpu': ${why}`);
  return { device: 'wasm', deviceFallback: `WebGPU unavailable (${why}): the model runs on WASM` };
}

let device = 'wasm';

async function load({ files: f, quantize, device: wanted, dtype }) {
  const mod = wasm.mod;
  const u8 = (b) => (b === undefined ? undefined : new Uint8Array(b));
  captioner?.free();
  captioner = null;
  if (refused) throw new Error(refused);
  const tokenizer = f.tokenizer !== undefined ? u8(f.tokenizer)
    : f.gpt2Vocab !== undefined && f.gpt2Merges !== undefined
      ? mod.gpt2TokenizerJson(u8(f.gpt2Vocab), u8(f.gpt2Merges), u8(f.tokenizerConfig), u8(f.specialTokensMap))
      : mod.bertTokenizerJson(u8(f.bertVocab), u8(f.tokenizerConfig), u8(f.specialTokensMap));
  const [templateName, template] = f.chatTemplateJinja !== undefined ? ['chat_template.jinja', f.chatTemplateJinja]
    : f.chatTemplateJson !== undefined ? ['chat_template.json', f.chatTemplateJson] : [undefined, undefined];
  // The constructor takes the weights (their tensors move into the model).
  const streamed = weights;
  weights = null;
  captioner = new mod.WasmCaptioner(u8(f.config), streamed, tokenizer, u8(f.preprocessor),
    u8(f.generation), u8(f.adapterConfig), u8(f.adapterWeights), templateName, u8(template));
  if (quantize) captioner.quantize(quantize);
  const chosen = await chooseDevice(wanted ?? 'wasm', dtype ?? 'fp32');
  device = chosen.device;
  postMessage({ type: 'loaded', defaults: captioner.generationDefaults(), threads: wasm.threads, memoryBytes: mod.memoryBytes(), threadsFallback: wasm.fallback, ...chosen });
}

function loadingStep(data) {
  switch (data.type) {
    case 'weights':
      return (async () => {
        const { mod } = await startWasm(data.threads ?? 1, data.threadStartMs);
        weights?.free();
        refused = null;
        weights = new mod.WasmWeights(data.name);
      })();
    case 'open':
      if (!refused) weights.open(data.file, data.size);
      return;
    case 'chunk':
      try {
        if (!refused) weights.push(data.file, new Uint8Array(data.chunk.buffer, data.chunk.byteOffset, data.chunk.byteLength));
      } finally {
        // The buffer goes back to be filled again (a refused chunk's too).
        postMessage({ type: 'consumed', buffer: data.chunk.buffer }, [data.chunk.buffer]);
      }
      return;
    case 'load':
      return load(data);
  }
}

self.onmessage = async ({ data }) => {
  switch (data.type) {
    case 'weights':
    case 'open':
    case 'chunk':
    case 'load':
      loading = loading.then(() => loadingStep(data)).catch((e) => {
        // Reported once; later steps of this load are dropped.
        if (!refused) postMessage({ type: 'error', message: message(e) });
        refused ??= message(e);
      });
      break;
    case 'caption':
      // One caption at a time; later ones wait their turn.
      busy = busy.then(() => caption(data));
      break;
    case 'captionMany':
      busy = busy.then(() => captionMany(data));
      break;
    case 'abort':
      aborted.add(data.run);
      break;
    case 'trapForTesting':
      busy = busy.then(() => {
        try {
          wasm.mod.trapForTesting();
        } catch (e) {
          failed(data.run, e);
        }
      });
      break;
  }
};
