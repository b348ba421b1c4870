// wasmcap in Node.js (≥ 20): the browser package's Captioner (index.js), its worker a
// worker_threads Worker (node-worker.js) running the same single-threaded WASM build.
// Models: a hub id (downloaded into the hub cache under HF_HOME / HF_HUB_CACHE, the layout the
// `caption` CLI, huggingface_hub and transformers share), a local folder path, an http(s) URL,
// or a map of files. Images: a file path, an http(s) URL, PNG/JPEG bytes (Buffer, Uint8Array,
// ArrayBuffer), or `{ data, width, height }` RGBA. Only what differs from the browser lives here:
// where files come from and how the worker starts.
import { Worker } from 'node:worker_threads';
import { openAsBlob, promises as fs } from 'node:fs';
import { join } from 'node:path';
import { homedir } from 'node:os';
import { fileURLToPath } from 'node:url';
import { Captioner as BrowserCaptioner, env, _setPlatform, _isHubId, _hubFolder, _WEIGHT_FILES as WEIGHT_FILES, _shardNames } from './index.js';

export { env };

// A worker_threads Worker with the Web Worker surface Captioner uses.
class NodeWorker extends EventTarget {
  constructor(url) {
    super();
    this._worker = new Worker(url);
    this.onmessage = null;
    this.onerror = null;
    this._worker.on('message', (data) => {
      const event = new MessageEvent('message', { data });
      this.onmessage?.(event);
      this.dispatchEvent(event);
    });
    this._worker.on('error', (error) => {
      const event = new Event('error');
      event.message = error?.message ?? String(error);
      this.onerror?.(event);
      this.dispatchEvent(event);
    });
  }

  postMessage(message, transfer) {
    this._worker.postMessage(message, transfer);
  }

  terminate() {
    this._worker.terminate();
  }
}

const isUrl = (s) => /^[a-z][a-z0-9+.-]*:\/\//i.test(s);

_setPlatform({
  createWorker: () => new NodeWorker(new URL('./node-worker.js', import.meta.url)),
  async readImage(image) {
    if (!(typeof image === 'string' && !isUrl(image)) && !(image instanceof URL && image.protocol === 'file:')) return null;
    const path = image instanceof URL ? fileURLToPath(image) : image;
    try {
      return await fs.readFile(path);
    } catch (e) {
      throw new Error(`image: could not read ${path} (${e.code ?? e.message})`);
    }
  },
});

async function isDirectory(path) {
  try {
    return (await fs.stat(path)).isDirectory();
  } catch {
    return false;
  }
}

// A folder's files as the map of name → Blob that the loader takes (read when the loader reads them).
async function folderFiles(dir) {
  const map = new Map();
  for (const name of await fs.readdir(dir)) {
    const path = join(dir, name);
    const stat = await fs.stat(path).catch(() => null);
    if (stat?.isFile()) map.set(name, await openAsBlob(path));
  }
  return map;
}

// The hub's settings as huggingface_hub reads them from the environment.
function hubEnv() {
  const v = (k) => (process.env[k] ? process.env[k] : undefined);
  const home = v('HF_HOME') ?? join(v('XDG_CACHE_HOME') ?? join(homedir(), '.cache'), 'huggingface');
  return {
    cache: v('HF_HUB_CACHE') ?? join(home, 'hub'),
    home,
    offline: ['1', 'true', 'yes', 'on'].includes((v('HF_HUB_OFFLINE') ?? '').toLowerCase()),
    token: v('HF_TOKEN'),
  };
}

const HEX40 = /^[0-9a-f]{40}$/i;

async function exists(path) {
  return fs.access(path).then(() => true, () => false);
}

// One repository of the hub and its folder in the cache (models--org--name/{blobs, snapshots,
// refs, .no_exist}); the same rules as the CLI's src/hub.rs: what the cache holds for a revision
// is used without the network, a file is renamed into blobs/ only once complete, a partial one
// is resumed with Range.
class HubRepo {
  constructor(spec, options) {
    const [id, at] = spec.split('@');
    this.id = id;
    this.revision = options.revision ?? at ?? 'main';
    this.hub = hubEnv();
    this.dir = join(this.hub.cache, `models--${id.replace('/', '--')}`);
    this.base = _hubFolder(spec, options);
    this.fetch = options.fetch ?? globalThis.fetch;
    this.signal = options.signal;
    this.onFile = options.onFile ?? (() => {});
  }

  async commit() {
    if (HEX40.test(this.revision)) return this.revision;
    const ref = await fs.readFile(join(this.dir, 'refs', this.revision), 'utf8').catch(() => '');
    return ref.trim() || null;
  }

  async writeRef(commit) {
    if (commit === this.revision) return;
    await fs.mkdir(join(this.dir, 'refs'), { recursive: true });
    await fs.writeFile(join(this.dir, 'refs', this.revision), commit);
  }

  // The file's path in the snapshot, or null when the repository does not have it.
  async get(file, required) {
    const commit = await this.commit();
    if (commit) {
      const cached = join(this.dir, 'snapshots', commit, file);
      if (await exists(cached)) return cached;
      if (await exists(join(this.dir, '.no_exist', commit, file))) return this.missing(file, required);
    }
    if (this.hub.offline) throw new Error(`${this.id}: ${file} of revision ${this.revision} is not in the cache ${this.hub.cache} and HF_HUB_OFFLINE is set`);
    const path = await this.download(file);
    return path ?? this.missing(file, required);
  }

  missing(file, required) {
    if (required) throw new Error(`${this.id}: no ${file} at revision ${this.revision}`);
    return null;
  }

  async download(file) {
    const url = new URL(file, this.base).href;
    const auth = this.hub.token ? { Authorization: `Bearer ${this.hub.token}` } : {};
    const fail = (why) => new Error(`${this.id}: could not download ${file} from ${url} (${why}); without network, pass its folder, or set HF_HUB_OFFLINE=1 to use what is cached`);
    let res;
    try {
      res = await this.fetch(url, { redirect: 'manual', headers: auth, signal: this.signal });
    } catch (e) {
      if (this.signal?.aborted) throw e;
      throw fail(e.message ?? String(e));
    }
    const code = res.headers.get('x-error-code') ?? '';
    if (res.status === 404 && code === 'EntryNotFound') {
      const commit = res.headers.get('x-repo-commit');
      if (commit && HEX40.test(commit)) {
        await fs.mkdir(join(this.dir, '.no_exist', commit), { recursive: true });
        await fs.writeFile(join(this.dir, '.no_exist', commit, file), '');
        await this.writeRef(commit);
      }
      return null;
    }
    if (res.status === 404 && code === 'RevisionNotFound') throw new Error(`${this.id}: no revision ${this.revision}`);
    if ([401, 403, 404].includes(res.status)) throw new Error(`${this.id}: no such repository (or it is private or gated: set HF_TOKEN)${code ? ` [${code}]` : ''}`);
    const redirect = res.status >= 300 && res.status < 400;
    if (!res.ok && !redirect) throw fail(`HTTP ${res.status}`);
    const commit = res.headers.get('x-repo-commit');
    if (!commit || !HEX40.test(commit)) throw fail('no X-Repo-Commit header: is the host a hub?');
    const etag = (res.headers.get('x-linked-etag') ?? res.headers.get('etag') ?? '').replace(/^W\//, '').replaceAll('"', '');
    if (!/^[\w-]+$/.test(etag)) throw fail(`ETag ${JSON.stringify(etag)} is not a file name`);
    const blobs = join(this.dir, 'blobs');
    await fs.mkdir(blobs, { recursive: true });
    const blob = join(blobs, etag);
    if (!(await exists(blob))) {
      const partial = `${blob}.incomplete`;
      const have = (await fs.stat(partial).catch(() => null))?.size ?? 0;
      let body = res;
      if (redirect || have > 0) {
        await res.body?.cancel();
        const target = redirect ? new URL(res.headers.get('location') ?? '', url) : new URL(url);
        // The token goes only to the hub itself, not to another host it redirects to.
        const headers = { ...(target.host === new URL(url).host ? auth : {}), ...(have > 0 ? { Range: `bytes=${have}-` } : {}) };
        try {
          body = await this.fetch(target.href, { headers, signal: this.signal });
        } catch (e) {
          if (this.signal?.aborted) throw e;
          throw fail(e.message ?? String(e));
        }
        if (body.status === 416) await fs.rm(partial, { force: true });
        if (!body.ok) throw fail(`HTTP ${body.status}`);
      }
      const resumed = body.status === 206;
      const range = body.headers.get('content-range');
      const total = resumed && range ? Number(range.split('/').pop()) : Number(body.headers.get('content-length') ?? NaN);
      const out = await fs.open(partial, resumed ? 'a' : 'w');
      try {
        const reader = body.body.getReader();
        for (;;) {
          let chunk;
          try {
            chunk = await reader.read();
          } catch (e) {
            if (this.signal?.aborted) throw e;
            throw fail(`the connection dropped: ${e.message}; load again to resume`);
          }
          if (chunk.done) break;
          await out.write(chunk.value);
          this.onFile(file, chunk.value.byteLength);
        }
        await out.sync();
      } finally {
        await out.close();
      }
      const got = (await fs.stat(partial)).size;
      if (Number.isFinite(total) && total !== got) throw fail(`got ${got} of ${total} bytes; load again to resume`);
      await fs.rename(partial, blob);
    } else {
      await res.body?.cancel();
    }
    const pointer = join(this.dir, 'snapshots', commit, file);
    await fs.mkdir(join(this.dir, 'snapshots', commit), { recursive: true });
    await fs.rm(pointer, { force: true });
    await fs.symlink(join('..', '..', 'blobs', etag), pointer).catch(() => fs.copyFile(blob, pointer));
    await this.writeRef(commit);
    return pointer;
  }

  // The files a model folder needs, as the CLI fetches them; returns the snapshot folder.
  async snapshot() {
    await this.get('config.json', true);
    let weights = null;
    for (const name of WEIGHT_FILES) {
      const path = await this.get(name, false);
      if (path) { weights = [name, path]; break; }
    }
    if (!weights) throw new Error(`${this.id}: none of ${WEIGHT_FILES.join(', ')} on the hub`);
    if (weights[0].endsWith('.index.json')) {
      for (const shard of _shardNames(weights[0], await fs.readFile(weights[1], 'utf8'))) await this.get(shard, true);
    }
    if (!(await this.get('tokenizer.json', false))) {
      for (const f of ['vocab.json', 'merges.txt', 'vocab.txt', 'tokenizer_config.json', 'special_tokens_map.json']) await this.get(f, false);
    }
    for (const f of ['preprocessor_config.json', 'generation_config.json']) await this.get(f, false);
    if (!(await this.get('chat_template.jinja', false))) await this.get('chat_template.json', false);
    return join(this.dir, 'snapshots', await this.commit());
  }
}

/**
 * Downloads what a hub id needs into the hub cache (or finds it there) and returns the snapshot
 * folder: the same folder the `caption` CLI would read.
 */
export async function snapshotDownload(id, options = {}) {
  if (!_isHubId(id)) throw new Error(`${id}: not a hub id (org/name or org/name@revision)`);
  return new HubRepo(id, options).snapshot();
}

// A model or adapter source as the browser loader takes it: a folder path becomes its files; a
// hub id (unless a folder of that name exists, which wins as in transformers) its snapshot's.
async function sourceOf(source, options, onFile) {
  if (source instanceof URL && source.protocol === 'file:') source = fileURLToPath(source);
  if (typeof source !== 'string' || isUrl(source)) return source;
  if (await isDirectory(source)) return folderFiles(source);
  if (_isHubId(source)) return folderFiles(await new HubRepo(source, { ...options, onFile }).snapshot());
  throw new Error(`${source}: no such folder, and not a hub id (org/name or org/name@revision) or URL`);
}

export class Captioner extends BrowserCaptioner {
  /**
   * Loads a model: a hub id, a local folder path, an http(s) URL or a map of files (see
   * index.d.ts). Hub downloads report progress per file as they arrive; the single-threaded
   * build runs in a worker_threads Worker. `dispose()` ends the worker (and lets the process exit).
   */
  static async fromPretrained(source, options = {}) {
    if (options.threads !== undefined && options.threads !== 1) throw new Error('threads: Node.js runs the single-threaded build; pass threads: 1 or leave it out');
    const { onProgress } = options;
    let loaded = 0;
    const perFile = new Map();
    const onFile = (file, n) => {
      loaded += n;
      perFile.set(file, (perFile.get(file) ?? 0) + n);
      onProgress?.({ file, url: null, fileLoaded: perFile.get(file), fileTotal: 0, fileDone: false, cached: false, loaded, total: 0, fraction: 0 });
    };
    const model = await sourceOf(source, options, onFile);
    const adapter = options.adapter === undefined || options.adapter === null ? options.adapter : await sourceOf(options.adapter, options, onFile);
    // No Cache API in Node: files on disk are read where they are; hub ones are cached above.
    return BrowserCaptioner.fromPretrained(model, { ...options, adapter, threads: 1, cache: false });
  }

  /** No Cache API in Node.js: hub files live in the hub cache (delete its models--org--name folder). */
  static clearCache() {
    return Promise.resolve(false);
  }
}

export default Captioner;
