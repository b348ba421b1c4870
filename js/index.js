// wasmcap — the JS side: fetch (with progress and the Cache API), image conversion, and a module
// Web Worker that runs the WASM. No model logic lives here; it only moves bytes and messages.
//
//   import { Captioner } from 'wasmcap';
//   const captioner = await Captioner.fromPretrained('https://host/model-folder/');
//   const run = captioner.caption(imageElement);
//   for await (const t of run) output.textContent = t.text;
//   const { text, tokenIds, timings } = await run.result;
//   const { sequences } = await captioner.caption(url, { numBeams: 4, numReturnSequences: 2 }).result;

export const CACHE_NAME = 'wasmcap-models-v1';

// What differs in Node.js (node.js fills it in): how the worker starts, and the bytes of an image
// given as a file path (null for any other image). The browser leaves both unset.
const platform = { createWorker: null, readImage: null };
/** @internal For node.js: the Node.js worker and image reading. */
export function _setPlatform(hooks) {
  Object.assign(platform, hooks);
}

const MODEL_FILES = [
  ['config', 'config.json', true],
  ['tokenizer', 'tokenizer.json', false],
  ['preprocessor', 'preprocessor_config.json', true],
  ['generation', 'generation_config.json', false],
  // A processor's chat template (SmolVLM's prompt), in transformers' order.
  ['chatTemplateJinja', 'chat_template.jinja', false],
  ['chatTemplateJson', 'chat_template.json', false],
];
// The weight files transformers looks for, in its order; an index (`*.index.json`) names shards.
const WEIGHT_FILES = ['model.safetensors', 'model.safetensors.index.json', 'pytorch_model.bin', 'pytorch_model.bin.index.json'];
// Only fetched when a folder has no tokenizer.json (older GPT-2 folders, nlpconnect's among them).
const GPT2_TOKENIZER_FILES = [
  ['gpt2Vocab', 'vocab.json', false],
  ['gpt2Merges', 'merges.txt', false],
  // …or BERT's (BLIP's older folders).
  ['bertVocab', 'vocab.txt', false],
  ['tokenizerConfig', 'tokenizer_config.json', false],
  ['specialTokensMap', 'special_tokens_map.json', false],
];
const ADAPTER_FILES = [
  ['adapterConfig', 'adapter_config.json', true],
  ['adapterWeights', 'adapter_model.safetensors', true],
];
// Marks "this optional file does not exist" in the cache, so a cached load makes no request at all.
const MISSING_HEADER = 'x-wasmcap-missing';
// The validators of the response a cached file came from (its ETag, else its Last-Modified).
const ETAG_HEADER = 'x-wasmcap-etag';
const MODIFIED_HEADER = 'x-wasmcap-last-modified';

function abortError(signal) {
  if (signal?.reason instanceof Error) return signal.reason;
  return new DOMException('The operation was aborted.', 'AbortError');
}

function throwIfAborted(signal) {
  if (signal?.aborted) throw abortError(signal);
}

function cacheAvailable() {
  return typeof caches !== 'undefined' && typeof caches.open === 'function';
}

/** Deletes every model file wasmcap stored in the Cache API (or, given a base URL, only that folder's). */
export async function clearCache(baseUrl) {
  if (!cacheAvailable()) return false;
  if (baseUrl === undefined) return caches.delete(CACHE_NAME);
  const cache = await caches.open(CACHE_NAME);
  const base = (isHubId(baseUrl) ? hubFolder(baseUrl, {}) : folderUrl(baseUrl)).href;
  let removed = false;
  for (const request of await cache.keys()) {
    if (request.url.startsWith(base)) removed = (await cache.delete(request)) || removed;
  }
  return removed;
}

/**
 * Where hub ids are fetched from, as transformers.js' `env`: `${remoteHost}${remotePathTemplate}`
 * with `{model}` and `{revision}` filled in. Change `remoteHost` to use a mirror.
 */
export const env = {
  remoteHost: 'https://huggingface.co/',
  remotePathTemplate: '{model}/resolve/{revision}/',
  // The weights stream into WASM through buffers of at most this many bytes (and of at most
  // 2 MiB; each tensor made as its bytes arrive), never one buffer a file (browsers cap an
  // ArrayBuffer at 2–4 GB, Node.js a Buffer at 2 GB); small files larger than this come in pieces.
  maxPieceBytes: 256 * 1024 * 1024,
  // How long the threaded build's pool may take to start before the single-threaded build is used
  // instead (a page whose worker scripts lack the COEP header never starts it).
  threadStartMs: 20000,
};

function pieceBytes() {
  const n = env.maxPieceBytes;
  if (!Number.isInteger(n) || n < 1) throw new Error(`env.maxPieceBytes must be a positive integer, not ${n}`);
  return n;
}

// The size of the buffers the weights stream through into WASM (and of at most env.maxPieceBytes).
const STREAM_CHUNK = 2 * 1024 * 1024;

// A weight file's bytes into `sink` (see loadFiles), a buffer at a time: each buffer is filled
// from `readable` (a byte stream read into it where the runtime allows, so no chunk is allocated
// per read), handed over, and comes back from the worker to be filled again — the JS memory of a
// load is the sink's few buffers, whatever the file's size, and leaves nothing to collect.
async function pump(readable, name, onChunk, sink) {
  const size = Math.min(pieceBytes(), STREAM_CHUNK);
  let reader, byob = true;
  try {
    reader = readable.getReader({ mode: 'byob' });
  } catch {
    reader = readable.getReader();
    byob = false;
  }
  let buffer = await sink.buffer(size);
  let filled = 0;
  let rest = null; // a default reader's chunk not yet copied
  try {
    for (;;) {
      let n;
      if (byob) {
        const { done, value } = await reader.read(new Uint8Array(buffer, filled));
        if (value) buffer = value.buffer; // the read took the buffer over and gives it back
        if (done) break;
        n = value.byteLength;
      } else {
        if (!rest?.byteLength) {
          const { done, value } = await reader.read();
          if (done) break;
          rest = value;
        }
        n = Math.min(rest.byteLength, size - filled);
        new Uint8Array(buffer, filled, n).set(rest.subarray(0, n));
        rest = rest.subarray(n);
      }
      filled += n;
      onChunk(n);
      if (filled === size) {
        await sink.push(name, new Uint8Array(buffer, 0, filled));
        buffer = await sink.buffer(size);
        filled = 0;
      }
    }
    if (filled) await sink.push(name, new Uint8Array(buffer, 0, filled));
    else sink.release(buffer);
  } catch (e) {
    reader.cancel(e).catch(() => {});
    throw e;
  }
}

// Collects a stream's chunks into pieces of at most `limit` bytes each (the last one shorter).
function pieceCollector(limit) {
  const pieces = [];
  let current = null;
  let at = 0;
  return {
    push(chunk) {
      let from = 0;
      while (from < chunk.byteLength) {
        if (!current) { current = new Uint8Array(limit); at = 0; }
        const n = Math.min(limit - at, chunk.byteLength - from);
        current.set(chunk.subarray(from, from + n), at);
        at += n;
        from += n;
        if (at === limit) { pieces.push(current.buffer); current = null; }
      }
    },
    finish() {
      if (current) pieces.push(current.buffer.slice(0, at));
      return pieces.length ? pieces : [new ArrayBuffer(0)];
    },
  };
}

// A file's pieces as one buffer: for the small files (config, tokenizer, index) only.
function joined(pieces) {
  if (pieces.length === 1) return pieces[0];
  const out = new Uint8Array(pieces.reduce((n, p) => n + p.byteLength, 0));
  let at = 0;
  for (const p of pieces) { out.set(new Uint8Array(p), at); at += p.byteLength; }
  return out.buffer;
}

// `org/name` or `org/name@revision`: no scheme, no leading `/` or `.`, no trailing `/` (a folder
// given as a relative path ends with `/` or starts with `./`).
const HUB_ID = /^[A-Za-z0-9][\w.-]*\/[\w.-]+(@[\w./-]+)?$/;

/** @internal Whether a string is a hub id (for node.js). */
export function _isHubId(source) {
  return isHubId(source);
}

/** @internal The folder URL of a hub id (for node.js). */
export function _hubFolder(id, options = {}) {
  return hubFolder(id, options);
}

function isHubId(source) {
  return typeof source === 'string' && HUB_ID.test(source) && !source.split('@')[0].split('/').some((p) => p === '..' || p === '.');
}

// The folder URL of a hub id: options.revision, else the id's `@revision`, else main.
function hubFolder(id, options) {
  const [model, atRevision] = id.split('@');
  const revision = options.revision ?? atRevision ?? 'main';
  const host = String(options.remoteHost ?? env.remoteHost).replace(/\/*$/, '/');
  const path = env.remotePathTemplate.replaceAll('{model}', model).replaceAll('{revision}', encodeURIComponent(revision));
  return new URL(path, host);
}

function folderUrl(base) {
  const href = base instanceof URL ? base.href : String(base);
  const url = new URL(href, globalThis.location?.href);
  if (!url.pathname.endsWith('/')) url.pathname += '/';
  return url;
}

function isFileMap(source) {
  return source instanceof Map || (typeof FileList !== 'undefined' && source instanceof FileList) ||
    Array.isArray(source) || (source !== null && typeof source === 'object' && !(source instanceof URL));
}

function fileMapOf(source) {
  const map = new Map();
  if (source instanceof Map) for (const [k, v] of source) map.set(k, v);
  else if (Array.isArray(source) || (typeof FileList !== 'undefined' && source instanceof FileList)) {
    for (const f of source) map.set(f.name, f);
  } else for (const [k, v] of Object.entries(source)) map.set(k, v);
  return map;
}

// One file to load: `open()` gives { size, read(onChunk) } without reading the body yet, so every
// file's size is known before any body is read and the overall total never grows.
function urlEntry(key, name, required, base, cache, reload, signal, fetchFn = globalThis.fetch) {
  const url = new URL(name, base).href;
  return {
    key, name, required, url, remote: true,
    async open() {
      let res;
      if (cache && !reload) {
        const hit = await cache.match(url);
        if (hit) {
          if (hit.headers.get(MISSING_HEADER)) return null;
          // A cached file is used as long as the server says it has not changed (a conditional
          // request: 304, no body); without validators, or offline, it is used as it is.
          const etag = hit.headers.get(ETAG_HEADER);
          const modified = hit.headers.get(MODIFIED_HEADER);
          if (!etag && !modified) return bodyOf(hit, true);
          try {
            res = await fetchFn(url, { signal, cache: 'no-store', headers: etag ? { 'If-None-Match': etag } : { 'If-Modified-Since': modified } });
          } catch (e) {
            if (signal?.aborted) throw abortError(signal);
            return bodyOf(hit, true);
          }
          if (res.status === 304 || !res.ok) {
            res.body?.cancel().catch(() => {});
            return bodyOf(hit, true);
          }
        }
      }
      try {
        res ??= await fetchFn(url, { signal, cache: reload ? 'reload' : 'default' });
      } catch (e) {
        if (signal?.aborted) throw abortError(signal);
        throw new Error(`${name}: could not fetch ${url} (${e.message ?? e})`);
      }
      // Dev servers with a single-page-app fallback (Vite's, for one) answer a missing file
      // with index.html and status 200: no model file is ever HTML.
      const html = /^text\/html/i.test(res.headers.get('Content-Type') ?? '');
      if (!res.ok || html) {
        if (!required && (res.status === 404 || html)) {
          if (cache) await cache.put(url, new Response(null, { status: 200, headers: { [MISSING_HEADER]: '1' } }));
          return null;
        }
        if (html) throw new Error(`${name}: ${url} answered with an HTML page, not the file (is the folder URL right?)`);
        throw new Error(`${name}: HTTP ${res.status} ${res.statusText} from ${url}`);
      }
      if (!cache || !res.body) return bodyOf(res, false);
      const headers = { 'Content-Type': res.headers.get('Content-Type') ?? 'application/octet-stream' };
      const length = res.headers.get('Content-Length');
      if (length) headers['Content-Length'] = length;
      const etag = res.headers.get('ETag');
      const modified = res.headers.get('Last-Modified');
      if (etag) headers[ETAG_HEADER] = etag;
      else if (modified) headers[MODIFIED_HEADER] = modified;
      // One branch into the Cache API as it arrives (stored only once the whole file is in: a
      // dropped download leaves nothing cached), the other to whoever reads the body.
      const [mine, cached] = res.body.tee();
      const stored = cache.put(url, new Response(cached, { headers }));
      stored.catch(() => {});
      const body = bodyOf(new Response(mine, { headers: res.headers }), false);
      const [read, stream] = [body.read, body.stream];
      body.read = async (onChunk) => { const pieces = await read(onChunk); await stored; return pieces; };
      body.stream = async (...args) => { await stream(...args); await stored; };
      return body;
    },
  };
}

// A file body: `read(onChunk)` gives its bytes as an array of ArrayBuffer pieces (one, unless
// the file is larger than env.maxPieceBytes); `stream(name, onChunk, sink)` hands them to the
// sink as they arrive (`pump`: the sink paces the download).
function bodyOf(res, cached) {
  const length = Number(res.headers.get('Content-Length'));
  return {
    cached,
    size: Number.isFinite(length) && length > 0 ? length : 0,
    async read(onChunk) {
      const limit = pieceBytes();
      if (!res.body) {
        const buf = await res.arrayBuffer();
        onChunk(buf.byteLength);
        return [buf];
      }
      const reader = res.body.getReader();
      const pieces = pieceCollector(limit);
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        pieces.push(value);
        onChunk(value.byteLength);
      }
      return pieces.finish();
    },
    async stream(name, onChunk, sink) {
      return pump(res.body ?? new Blob([]).stream(), name, onChunk, sink);
    },
  };
}

function blobEntry(key, name, required, map) {
  const blob = map.get(name);
  return {
    key, name, required, url: name,
    async open() {
      if (blob === undefined) {
        if (required) throw new Error(`${name}: missing from the files given`);
        return null;
      }
      return {
        cached: false,
        size: blob.size,
        async read(onChunk) {
          // Sliced: a File larger than one ArrayBuffer is read piece by piece.
          const limit = pieceBytes();
          const pieces = [];
          for (let at = 0; at < blob.size || pieces.length === 0; at += limit) {
            const buf = await blob.slice(at, Math.min(blob.size, at + limit)).arrayBuffer();
            onChunk(buf.byteLength);
            pieces.push(buf);
          }
          return pieces;
        },
        async stream(name, onChunk, sink) {
          return pump(blob.stream(), name, onChunk, sink);
        },
        exact: true,
      };
    },
  };
}

// The shard files a checkpoint index (`weight_map`: tensor → file) names, each once; a name that
// is not a plain file name is refused.
function shardNames(indexName, text) {
  let map;
  try {
    map = JSON.parse(text).weight_map;
  } catch (e) {
    throw new Error(`${indexName}: not valid JSON (${e.message})`);
  }
  if (map === null || typeof map !== 'object') throw new Error(`${indexName}: no weight_map object`);
  const names = [...new Set(Object.values(map))];
  const bad = names.find((n) => typeof n !== 'string' || !n || /[\\/]/.test(n) || n === '..' || n === '.');
  if (bad !== undefined) throw new Error(`${indexName}: the shard ${JSON.stringify(bad)} is not a file name in the model folder`);
  return names;
}

/** @internal For node.js: the weight files in transformers' order, and an index's shards. */
export const _WEIGHT_FILES = WEIGHT_FILES;
export const _shardNames = shardNames;

// The weights: the first of WEIGHT_FILES the folder has (asked for one at a time, so a folder
// with model.safetensors makes no other request). An index is read at once and its shards are
// returned unopened, so the caller opens them with the rest and the progress total covers them.
async function openWeights(source, entriesFor, signal) {
  let weights = null;
  for (const name of WEIGHT_FILES) {
    const [entry] = entriesFor(source, [['weights', name, false]]);
    const body = await entry.open();
    throwIfAborted(signal);
    if (body) { weights = { entry, body }; break; }
  }
  if (!weights) throw new Error(`model.safetensors: missing from the model folder (nor are ${WEIGHT_FILES.slice(1).join(', ')} there)`);
  const name = weights.entry.name;
  if (!name.endsWith('.index.json')) return weights;
  const bytes = joined(await weights.body.read(() => {}));
  throwIfAborted(signal);
  const names = shardNames(name, new TextDecoder().decode(bytes));
  weights.body = {
    cached: weights.body.cached,
    size: bytes.byteLength,
    exact: true,
    read: async (onChunk) => { onChunk(bytes.byteLength); return [bytes]; },
    stream: async (name, onChunk, sink) => pump(new Blob([bytes]).stream(), name, onChunk, sink),
  };
  weights.shards = { names, entries: entriesFor(source, names.map((n, i) => [`shard${i}`, n, true])) };
  return weights;
}

/** @internal For tests: the small files fromPretrained hands the worker; the weights go to `sink`. */
export function _loadFiles(source, adapter, options, sink) {
  return loadFiles(source, adapter, options, sink);
}

// The model's files: the small ones returned (`files`), the weight file and any shards streamed
// into `sink`: `weights(name)` once, `open(name, size)` per file, then its chunks in order, each
// in a buffer from `buffer(bytes)` handed over with `push(name, view)` (or given back unused with
// `release(buffer)`); all awaited.
async function loadFiles(source, adapter, options, sink) {
  const { onProgress, cache: useCache = true } = options;
  // Aborted too when the weights are refused mid-stream, so that no download goes on into the cache.
  const stop = new AbortController();
  const signal = options.signal ? AbortSignal.any([options.signal, stop.signal]) : stop.signal;
  const cache = useCache && cacheAvailable() ? await caches.open(CACHE_NAME) : null;
  const reload = useCache === 'reload';
  const entriesFor = (src, list) => {
    if (isFileMap(src)) {
      const map = fileMapOf(src);
      return list.map(([k, n, r]) => blobEntry(k, n, r, map));
    }
    const base = isHubId(src) ? hubFolder(src, options) : folderUrl(src);
    return list.map(([k, n, r]) => urlEntry(k, n, r, base, cache, reload, signal, options.fetch ?? globalThis.fetch));
  };
  const entries = entriesFor(source, MODEL_FILES);
  if (adapter !== undefined && adapter !== null) entries.push(...entriesFor(adapter, ADAPTER_FILES));
  // Also take an adapter that comes along in the same file map as the model.
  else if (isFileMap(source) && fileMapOf(source).has('adapter_config.json')) entries.push(...entriesFor(source, ADAPTER_FILES));

  // All opened together; when several fail, report the first in file order (config.json
  // first), not whichever request happened to fail first.
  const openAll = async (list) => {
    const opened = await Promise.allSettled(list.map((e) => e.open()));
    throwIfAborted(signal);
    const failed = opened.find((o) => o.status === 'rejected');
    if (failed) throw failed.reason;
    return opened.map((o) => o.value);
  };
  // config.json's failure first, then the weights', then the others' (transformers' order).
  const settled = await Promise.allSettled(entries.map((e) => e.open()));
  throwIfAborted(signal);
  if (settled[0].status === 'rejected') throw settled[0].reason;
  const weights = await openWeights(source, entriesFor, signal);
  const failed = settled.find((o) => o.status === 'rejected');
  if (failed) throw failed.reason;
  const bodies = settled.map((o) => o.value);
  // No tokenizer.json: GPT-2's vocab.json + merges.txt, opened before any body is read so the
  // progress total is known from the start.
  if (!bodies[entries.findIndex((e) => e.key === 'tokenizer')]) {
    const fallback = entriesFor(source, GPT2_TOKENIZER_FILES);
    const more = await openAll(fallback);
    if (!(more[0] && more[1]) && !more[2]) throw new Error('tokenizer.json: missing from the model folder (nor are GPT-2\'s vocab.json and merges.txt, or BERT\'s vocab.txt, there)');
    entries.push(...fallback);
    bodies.push(...more);
  }
  if (weights.shards) {
    entries.push(...weights.shards.entries);
    bodies.push(...await openAll(weights.shards.entries));
  }
  entries.push(weights.entry);
  bodies.push(weights.body);
  const present = entries.map((e, i) => ({ ...e, body: bodies[i] })).filter((e) => e.body);
  let total = present.reduce((s, e) => s + e.body.size, 0);
  let loaded = 0;
  let fraction = 0;
  const perFile = new Map(present.map((e) => [e.name, 0]));
  const emit = (e, done) => {
    if (!onProgress) return;
    total = Math.max(total, loaded);
    fraction = Math.max(fraction, total ? loaded / total : 0);
    const fileLoaded = perFile.get(e.name);
    onProgress({
      file: e.name, url: e.url, fileLoaded, fileTotal: done ? fileLoaded : Math.max(e.body.size, fileLoaded),
      fileDone: done, cached: e.body.cached, loaded, total, fraction,
    });
  };
  // If the model then fails to load, these entries are dropped so a fixed file is fetched again.
  const forget = cache ? () => Promise.all(entries.filter((e) => e.remote).map((e) => cache.delete(e.url))) : async () => {};
  const files = {};
  await sink.weights(weights.entry.name);
  const streamed = (e) => e.key === 'weights' || e.key.startsWith('shard');
  for (const e of present) if (streamed(e)) await sink.open(e.name, e.body.exact ? e.body.size : undefined);
  try {
    await Promise.all(present.map(async (e) => {
      emit(e, false);
      const onChunk = (n) => {
        perFile.set(e.name, perFile.get(e.name) + n);
        loaded += n;
        emit(e, false);
      };
      if (streamed(e)) {
        await e.body.stream(e.name, onChunk, sink);
      } else {
        files[e.key] = joined(await e.body.read(onChunk));
      }
      throwIfAborted(options.signal);
      emit(e, true);
    }));
  } catch (e) {
    stop.abort(e);
    // A file refused mid-stream is not kept (the next load fetches it again).
    if (e.name !== 'AbortError') await forget().catch(() => {});
    throw e;
  }
  // Every byte is in: 100 %, whatever the servers declared.
  total = loaded;
  fraction = 1;
  onProgress?.({ file: null, url: null, fileLoaded: 0, fileTotal: 0, fileDone: true, cached: false, loaded, total, fraction, done: true });
  return { files, forget };
}

// PNG and JPEG are decoded in Rust (as Pillow decodes them); other formats (WebP, GIF, AVIF, …) by
// the browser, which sniffs the bytes whatever their MIME type; without one (Node.js) Rust says
// which format it is.
function bytesMessage(bytes) {
  const head = new Uint8Array(bytes, 0, Math.min(4, bytes.byteLength));
  const png = head[0] === 0x89 && head[1] === 0x50 && head[2] === 0x4e && head[3] === 0x47;
  const jpeg = head[0] === 0xff && head[1] === 0xd8;
  if (png || jpeg || bytes.byteLength === 0 || typeof createImageBitmap !== 'function') return [{ kind: 'bytes', data: bytes }, [bytes]];
  return [{ kind: 'blob', blob: new Blob([bytes]) }, []];
}

async function imageMessage(image, signal) {
  // Node.js: a file path becomes its bytes.
  const read = platform.readImage ? await platform.readImage(image) : null;
  if (read) image = read;
  // PNG/JPEG bytes (decoded in Rust), or RGBA pixels { data, width, height } (copied: the caller
  // keeps its array).
  if (image instanceof ArrayBuffer || ArrayBuffer.isView(image)) {
    const view = image instanceof ArrayBuffer ? new Uint8Array(image) : new Uint8Array(image.buffer, image.byteOffset, image.byteLength);
    return bytesMessage(view.slice().buffer);
  }
  const isImageData = typeof ImageData !== 'undefined' && image instanceof ImageData;
  if (!isImageData && image !== null && typeof image === 'object' && 'data' in image && 'width' in image && 'height' in image) {
    const data = new Uint8Array(image.data.buffer ? new Uint8Array(image.data.buffer, image.data.byteOffset, image.data.byteLength) : image.data);
    return [{ kind: 'rgba', data, width: image.width, height: image.height }, [data.buffer]];
  }
  if (typeof image === 'string' || image instanceof URL) {
    let res;
    try {
      res = await fetch(image, { signal });
    } catch (e) {
      if (signal?.aborted) throw abortError(signal);
      throw new Error(`image: could not fetch ${image} (${e.message ?? e})`);
    }
    if (!res.ok) throw new Error(`image: HTTP ${res.status} ${res.statusText} from ${res.url}`);
    image = await res.blob();
  }
  if (typeof Blob !== 'undefined' && image instanceof Blob) return bytesMessage(await image.arrayBuffer());
  if (typeof ImageData !== 'undefined' && image instanceof ImageData) {
    const data = new Uint8Array(image.data); // a copy: the caller keeps its ImageData
    return [{ kind: 'rgba', data, width: image.width, height: image.height }, [data.buffer]];
  }
  if (typeof HTMLImageElement !== 'undefined' && image instanceof HTMLImageElement) {
    if (!image.complete || image.naturalWidth === 0) await image.decode();
  }
  if (typeof ImageBitmap !== 'undefined' && image instanceof ImageBitmap) {
    // A copy, so the caller's bitmap stays usable.
    const bitmap = await createImageBitmap(image);
    return [{ kind: 'bitmap', bitmap }, [bitmap]];
  }
  const drawable = [globalThis.HTMLImageElement, globalThis.HTMLCanvasElement, globalThis.OffscreenCanvas,
    globalThis.SVGImageElement, globalThis.HTMLVideoElement, globalThis.VideoFrame].filter(Boolean);
  if (drawable.some((T) => image instanceof T)) {
    const bitmap = await createImageBitmap(image);
    return [{ kind: 'bitmap', bitmap }, [bitmap]];
  }
  throw new TypeError('image: expected a URL, Blob/File, PNG/JPEG bytes, { data, width, height } RGBA, ImageData, HTMLImageElement, HTMLCanvasElement, OffscreenCanvas or ImageBitmap');
}

/** A caption in progress: an async iterable of `{ id, text, delta }`, with `result` the final caption. */
class CaptionRun {
  constructor() {
    this._events = [];
    this._waiting = null;
    this._ended = false;
    this._error = null;
    this.result = new Promise((ok, fail) => { this._ok = ok; this._fail = fail; });
    this.result.catch(() => {}); // iterating alone must not leave an unhandled rejection behind
  }
  _push(token) {
    if (this._ended) return;
    if (this._waiting) { const w = this._waiting; this._waiting = null; w.ok({ value: token, done: false }); } else this._events.push(token);
  }
  _finish(result) {
    if (this._ended) return;
    this._ended = true;
    this._ok(result);
    if (this._waiting) { const w = this._waiting; this._waiting = null; w.ok({ value: undefined, done: true }); }
  }
  _reject(error) {
    if (this._ended) return;
    this._ended = true;
    this._error = error;
    this._events.length = 0; // after an error or abort, the iteration stops with it at once
    this._fail(error);
    if (this._waiting) { const w = this._waiting; this._waiting = null; w.fail(error); }
  }
  get settled() { return this._ended; }
  [Symbol.asyncIterator]() {
    return {
      next: () => {
        if (this._events.length) return Promise.resolve({ value: this._events.shift(), done: false });
        if (this._error) return Promise.reject(this._error);
        if (this._ended) return Promise.resolve({ value: undefined, done: true });
        return new Promise((ok, fail) => { this._waiting = { ok, fail }; });
      },
      return: () => { this._cancel?.(); return Promise.resolve({ value: undefined, done: true }); },
    };
  }
  /** Stops this caption (the same as aborting its signal). */
  abort() { this._cancel?.(); }
}

// Threads need SharedArrayBuffer, which only a crossOriginIsolated page has.
function defaultThreads() {
  if (!globalThis.crossOriginIsolated) return 1;
  return Math.max(1, Math.min(8, globalThis.navigator?.hardwareConcurrency ?? 1));
}

// The buffers a load streams the weights through (STREAM_CHUNK bytes each): while all are with
// the worker, the download waits.
const STREAM_BUFFERS = 8;

/** A worker with the model loaded: { worker, defaults, threads, memoryBytes }. */
async function startWorker(source, options) {
  const { signal, threads } = options;
  throwIfAborted(signal);
  // Written out literally so bundlers (Vite, webpack) find and emit the worker and its wasm.
  const worker = options.workerUrl
    ? new Worker(options.workerUrl, { type: 'module', name: 'wasmcap' })
    : platform.createWorker
      ? platform.createWorker()
      : new Worker(new URL('./worker.js', import.meta.url), { type: 'module', name: 'wasmcap' });
  // The worker's answers: 'consumed' (chunks in WASM memory: the download may go on), then
  // 'loaded'; 'error' (a refused chunk, a failed start or load) ends it all.
  let failure = null;
  let loaded = null;
  let settle = null;
  // Buffers free to fill, and how many exist.
  const free = [];
  let buffers = 0;
  let waiting = [];
  const wake = () => { const w = waiting; waiting = []; for (const f of w) f(); };
  const fail = (error) => { failure ??= error; wake(); settle?.(); };
  const onAbort = () => fail(abortError(signal));
  signal?.addEventListener('abort', onAbort, { once: true });
  worker.onmessage = ({ data }) => {
    if (data.type === 'consumed') {
      free.push(data.buffer);
      wake();
    } else if (data.type === 'loaded') {
      loaded = data;
      settle?.();
    } else if (data.type === 'error') fail(new Error(data.message));
  };
  worker.onerror = (e) => {
    e.preventDefault?.();
    fail(new Error(`wasmcap worker failed to start: ${e.message ?? 'could not load worker.js'}`));
  };
  const check = () => { if (failure) throw failure; };
  const sink = {
    async weights(name) {
      check();
      worker.postMessage({ type: 'weights', name, threads, threadStartMs: env.threadStartMs });
    },
    async open(file, size) {
      check();
      worker.postMessage({ type: 'open', file, size });
    },
    async buffer(bytes) {
      for (;;) {
        check();
        const buffer = free.pop();
        if (buffer?.byteLength === bytes) return buffer;
        if (buffer) buffers -= 1; // another size (env.maxPieceBytes changed): dropped
        if (buffers < STREAM_BUFFERS) {
          buffers += 1;
          return new ArrayBuffer(bytes);
        }
        await new Promise((ok) => waiting.push(ok));
      }
    },
    release(buffer) {
      free.push(buffer);
      wake();
    },
    async push(file, view) {
      check();
      worker.postMessage({ type: 'chunk', file, chunk: view }, [view.buffer]);
    },
  };
  let forget = async () => {};
  try {
    const got = await loadFiles(source, options.adapter, options, sink);
    forget = got.forget;
    check();
    const done = new Promise((ok) => { settle = ok; });
    worker.postMessage({ type: 'load', files: got.files, quantize: options.quantize, device: options.device ?? 'wasm', dtype: options.dtype ?? 'fp32' }, Object.values(got.files).filter((b) => b instanceof ArrayBuffer));
    if (!loaded && !failure) await done;
    check();
  } catch (e) {
    worker.terminate();
    if (e.name !== 'AbortError') await forget().catch(() => {});
    throw e;
  } finally {
    signal?.removeEventListener('abort', onAbort);
  }
  worker.onmessage = null;
  worker.onerror = null;
  if (loaded.threadsFallback) console.warn(`wasmcap: ${loaded.threadsFallback}`);
  if (loaded.deviceFallback) console.warn(`wasmcap: ${loaded.deviceFallback}`);
  const { defaults, memoryBytes, threadsFallback, device, adapter, deviceFallback, dtype } = loaded;
  return { worker, defaults, threads: loaded.threads, memoryBytes, threadsFallback, device, adapter, deviceFallback, dtype };
}

/** The error of a call during which the WASM instance trapped (`name`: 'WasmcapCrashError'). */
function crashError(message) {
  const error = new Error(`wasmcap: the WASM instance crashed (${message}); a fresh one is loading the model again — call again`);
  error.name = 'WasmcapCrashError';
  return error;
}

export class Captioner {
  /** Use `Captioner.fromPretrained`. */
  constructor({ worker, defaults = {}, threads = 1, memoryBytes = 0, threadsFallback = null, device = 'wasm', adapter = null, deviceFallback = null, dtype = null }, restart = null) {
    /** Where the encoder side runs: 'webgpu' or 'wasm'. */
    this.device = device;
    /** The GPU adapter when `device` is 'webgpu', else null. */
    this.adapter = adapter ?? null;
    /** Why `device: 'auto'` chose 'wasm', else null. */
    this.deviceFallback = deviceFallback ?? null;
    /** How the GPU stores the model's matrices ('fp32' or 'fp16') when `device` is 'webgpu', else null. */
    this.dtype = dtype ?? null;
    /** The threads the model runs on (1: the single-threaded build). */
    this.threads = threads;
    /** Why fewer threads than asked run the model (the pool did not start), or null. */
    this.threadsFallback = threadsFallback ?? null;
    /** WASM memory in bytes: its peak so far (WASM memory never shrinks) — after loading, then after each caption. */
    this.memoryBytes = memoryBytes;
    /** The generation options the model's generation_config.json sets (camelCase). */
    this.generationDefaults = Object.freeze({ ...defaults });
    /** How many times a trapped WASM instance was replaced (its worker restarted, the model reloaded). */
    this.restarts = 0;
    this._runs = new Map();
    this._nextRun = 1;
    this._disposed = false;
    this._restart = restart;
    this._ready = Promise.resolve();
    // Calls reach the worker in the order they were made (their images are read concurrently,
    // a small file can be ready before a large one): each is sent once the one before was.
    this._sent = Promise.resolve();
    this._attach(worker);
  }

  _attach(worker) {
    this._worker = worker;
    worker.addEventListener('message', ({ data }) => {
      if (worker !== this._worker) return;
      const run = this._runs.get(data.run);
      if (!run) return;
      if (data.type === 'token') run._push(data.token);
      else if (data.type === 'encode') run._onEncode?.(data.progress);
      else if (data.type === 'error' && data.trapped) this._crashed(crashError(data.message));
      else {
        this._runs.delete(data.run);
        if (data.memoryBytes) this.memoryBytes = data.memoryBytes;
        if (data.type === 'done') run._finish(data.result);
        else if (data.type === 'aborted') run._reject(run._abortReason ?? abortError());
        else if (data.type === 'error') run._reject(new Error(data.message));
      }
    });
    worker.addEventListener('error', (e) => {
      if (worker !== this._worker) return;
      e.preventDefault?.();
      this._crashed(crashError(`worker error: ${e.message ?? 'failed'}`));
    });
  }

  // The instance is gone: every call sent to it fails with `error`, and a fresh worker loads the
  // model again; calls made meanwhile wait for it.
  _crashed(error) {
    for (const run of this._runs.values()) if (run._sent) run._reject(error);
    for (const [id, run] of this._runs) if (run._sent) this._runs.delete(id);
    this._worker.terminate();
    if (!this._restart || this._disposed) {
      const gone = Promise.reject(error);
      gone.catch(() => {});
      this._ready = gone;
      return;
    }
    this._worker = null;
    this._ready = this._restart().then((started) => {
      if (this._disposed) { started.worker.terminate(); throw new Error('wasmcap: this captioner was disposed'); }
      this.restarts += 1;
      this.memoryBytes = started.memoryBytes;
      this._attach(started.worker);
    });
    this._ready.catch(() => {});
  }

  /** Traps the WASM instance, as a bug would (tests of the recovery only). */
  _trapForTesting() {
    const run = new CaptionRun();
    const id = this._nextRun++;
    this._runs.set(id, run);
    run._sent = true;
    this._worker.postMessage({ type: 'trapForTesting', run: id });
    return run.result;
  }

  /**
   * Loads a model. `source`: a hub id (`org/name` or `org/name@revision`, fetched from
   * `options.remoteHost` / `env.remoteHost` at `options.revision`, with `options.fetch` if given),
   * the base URL of a 🤗-layout folder (config.json, the weights —
   * model.safetensors, else a sharded index, pytorch_model.bin or its sharded index —,
   * tokenizer.json, preprocessor_config.json, optional generation_config.json), or a map of
   * file name → File/Blob (a Map, a plain object, a FileList or an array of Files).
   * Options: `onProgress(event)`, `cache` (default true: the Cache API; 'reload': fetch again and
   * replace what is cached; false: neither read nor write it), `signal`, `adapter`
   * (a PEFT LoRA folder's URL or file map), `workerUrl` (override where the worker script lives),
   * `quantize` (`'q8_0'` or `'q4_0'`: the decoder's matrices quantized after loading — a quarter
   * or an eighth of the bytes read per token, captions close to f32's — and the encoder side
   * multiplied in 8 bits), `device` ('wasm', 'webgpu', 'auto') and `dtype` ('fp32', 'fp16': how
   * the GPU stores the matrices), `threads` (default: up to
   * 8 — the cores — on a crossOriginIsolated page, where the threaded build loads; 1 elsewhere,
   * the single-threaded build; more than 1 on a page that is not isolated rejects).
   */
  static async fromPretrained(source, options = {}) {
    const threads = options.threads ?? defaultThreads();
    if (!Number.isInteger(threads) || threads < 1) throw new Error(`threads must be a positive integer, not ${threads}`);
    const device = options.device ?? 'wasm';
    if (!['wasm', 'webgpu', 'auto'].includes(device)) throw new Error(`device must be 'wasm', 'webgpu' or 'auto', not ${JSON.stringify(device)}`);
    const dtype = options.dtype ?? 'fp32';
    if (!['fp32', 'fp16'].includes(dtype)) throw new Error(`dtype must be 'fp32' or 'fp16', not ${JSON.stringify(dtype)}`);
    const started = await startWorker(source, { ...options, threads });
    // After a trap the model loads again from the same source (the Cache API, a File map), quietly.
    const { onProgress, signal, ...again } = options;
    return new Captioner(started, () => startWorker(source, { ...again, threads }));
  }

  /** Deletes the model files kept in the Cache API (all of them, or one folder's). */
  static clearCache(baseUrl) {
    return clearCache(baseUrl);
  }

  /**
   * Captions an image (URL, Blob/File, PNG/JPEG bytes as an ArrayBuffer or typed array,
   * `{ data, width, height }` RGBA, ImageData, HTMLImageElement, HTMLCanvasElement,
   * OffscreenCanvas, ImageBitmap; in Node.js also a file path). Options: `signal`, `onEncode({ encoded, tiles })`
   * (after each batch of the image's tiles through the encoder: a split SmolVLM image has up to
   * 17; an abort takes effect between batches), and the generation options of the WASM
   * API, passed on unchanged (camelCase; unknown keys and bad values reject with Rust's message):
   * `maxNewTokens`, `prompt` (prefix models), `doSample`, `temperature`, `topK`, `topP`, `seed`,
   * `repetitionPenalty`, `noRepeatNgramSize`, `minNewTokens`, `badWordsIds`; for beam search
   * `numBeams`, `numReturnSequences`, `lengthPenalty`, `earlyStopping`. Options not given take
   * the model's generation_config.json values (`generationDefaults`), as transformers' generate()
   * does — including beam search when it sets `num_beams` (pass `numBeams: 1` for greedy).
   * Returns an async iterable of `{ id, text, delta }`; its `result` promise gives
   * `{ text, tokenIds, timings: { encoderMs, firstTokenMs, totalMs, tokensPerS } }`.
   * When `numBeams` (given, or generation_config.json's) is above 1 it runs beam search
   * (`numReturnSequences` up to `numBeams`): the iteration yields the best running hypothesis after each step as
   * `{ provisional: true, text, tokenIds }`, then the final best with `provisional: false`, and
   * `result` gives `{ text, tokenIds, score, sequences, timings: { totalMs } }`.
   */
  caption(image, options = {}) {
    return this._run([image], options, false);
  }

  /**
   * Captions several images at once: one encoder batch, decoded together in WASM — the same
   * captions as one by one, in fewer passes over the weights. Options as for `caption` (beam
   * search with `numBeams`). Iterate for `{ index, id, text, delta }` (beam search:
   * `{ index, provisional: true, text, tokenIds }`); `result` gives an array of results, one per
   * image, in order. A batch cannot be stopped once it reached the worker (abort before that).
   */
  captionMany(images, options = {}) {
    return this._run(Array.from(images ?? []), options, true);
  }

  _run(images, options, many) {
    const { signal, onEncode, ...rest } = options ?? {};
    // Keys left undefined count as not given; everything else goes to Rust as it is, which
    // validates it and decides between one sequence and beam search (src/generation.rs).
    const wasmOptions = Object.fromEntries(Object.entries(rest).filter(([, v]) => v !== undefined));
    const run = new CaptionRun();
    run._onEncode = onEncode;
    const id = this._nextRun++;
    if (this._disposed) { run._reject(new Error('wasmcap: this captioner was disposed')); return run; }
    if (signal?.aborted) { run._reject(abortError(signal)); return run; }
    if (many && images.length === 0) { run._reject(new TypeError('captionMany: no images')); return run; }
    let sent = false;
    const cancel = (reason) => {
      if (run.settled) return;
      run._abortReason = reason ?? abortError();
      if (sent) this._worker?.postMessage({ type: 'abort', run: id });
      this._runs.delete(id);
      run._reject(run._abortReason);
    };
    run._cancel = () => cancel();
    const onAbort = () => cancel(abortError(signal));
    signal?.addEventListener('abort', onAbort, { once: true });
    run.result.finally(() => signal?.removeEventListener('abort', onAbort)).catch(() => {});
    this._runs.set(id, run);
    const prepared = Promise.all(images.map((image) => imageMessage(image, signal)));
    prepared.catch(() => {}); // its failure is this call's, handled below when its turn comes
    const turn = this._sent.then(() => prepared).then(async (messages) => {
      const close = () => messages.forEach(([msg]) => msg.bitmap?.close());
      try {
        await this._ready; // a restart after a trap, if one is under way
      } catch (e) {
        close();
        throw e;
      }
      if (run.settled || this._disposed) { close(); return; }
      const transfer = messages.flatMap(([, t]) => t);
      if (many) this._worker.postMessage({ type: 'captionMany', run: id, images: messages.map(([msg]) => msg), options: wasmOptions }, transfer);
      else this._worker.postMessage({ type: 'caption', run: id, image: messages[0][0], options: wasmOptions }, transfer);
      sent = true;
      run._sent = true;
    });
    this._sent = turn.catch((e) => { this._runs.delete(id); run._reject(e); });
    return run;
  }

  /** Stops the worker and frees the model's memory. The captioner cannot be used afterwards. */
  dispose() {
    if (this._disposed) return;
    this._disposed = true;
    const error = new Error('wasmcap: this captioner was disposed');
    for (const run of this._runs.values()) run._reject(error);
    this._runs.clear();
    this._worker?.terminate(); // terminating drops the whole WASM instance and its memory
  }
}

export default Captioner;
