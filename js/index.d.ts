/** wasmcap: image captioning in the browser (Rust + candle compiled to wasm32 + SIMD128, run in a Web Worker). */

/** One generated token. `text` is the caption so far, `delta` what this token added (never a split character). */
export interface TokenEvent {
  id: number;
  text: string;
  delta: string;
}

export interface CaptionTimings {
  /** Image encoder (and, for prefix models, projector) time. */
  encoderMs: number;
  /** From the start of the caption to the first token. */
  firstTokenMs: number;
  totalMs: number;
  tokensPerS: number;
}

export interface CaptionResult {
  text: string;
  tokenIds: number[];
  timings: CaptionTimings;
}

export interface ProgressEvent {
  /** The file this event is about; `null` on the final event. */
  file: string | null;
  url: string | null;
  /** Bytes of `file` read so far, and its size (from Content-Length or the Blob). */
  fileLoaded: number;
  fileTotal: number;
  fileDone: boolean;
  /** Whether `file` came from the Cache API instead of the network. */
  cached: boolean;
  /** Bytes of all files read so far, and their total. */
  loaded: number;
  total: number;
  /** loaded / total, never decreasing; exactly 1 on the last event. */
  fraction: number;
  /** Set on the last event, once every file is read. */
  done?: boolean;
}

/**
 * The files of a model folder by name (`config.json`, `model.safetensors` — or
 * `model.safetensors.index.json` and its shards, `pytorch_model.bin`, `pytorch_model.bin.index.json`
 * and its shards, the first of these found —, `tokenizer.json`, …).
 */
export type FileMap = Map<string, Blob> | Record<string, Blob> | FileList | File[];

/**
 * Where hub ids are fetched from, as transformers.js' `env`: `${remoteHost}${remotePathTemplate}`,
 * `{model}` and `{revision}` filled in. `maxPieceBytes` (default 256 MiB): the weights stream into
 * WASM through buffers of at most this many bytes (and at most 2 MiB), never one buffer a file.
 * `threadStartMs` (default 20000): how long the threaded build's pool may take to start before
 * the single-threaded build runs instead (`captioner.threadsFallback` says so).
 */
export declare const env: { remoteHost: string; remotePathTemplate: string; maxPieceBytes: number; threadStartMs: number };

export interface LoadOptions {
  onProgress?: (event: ProgressEvent) => void;
  /** A hub id's revision (branch, tag or commit); default: the id's `@revision`, else `main`. */
  revision?: string;
  /** Where a hub id is fetched from (default `env.remoteHost`, `https://huggingface.co/`). */
  remoteHost?: string;
  /** The `fetch` every model file is requested with (default: the global one). */
  fetch?: typeof globalThis.fetch;
  /**
   * true (default): read files from the Cache API, fetch and store those missing (kept until
   * `clearCache`; dropped again if the model fails to load). 'reload': fetch everything anew and
   * replace the cached copies. false: leave the Cache API alone.
   */
  cache?: boolean | 'reload';
  signal?: AbortSignal;
  /** A PEFT LoRA adapter (adapter_config.json + adapter_model.safetensors): folder URL or files. */
  adapter?: string | URL | FileMap;
  /** Where the worker script lives, if a bundler did not keep it next to this module. */
  workerUrl?: string | URL;
  /** Quantize the decoder's matrices after loading (rows not a multiple of 32 stay f32), and multiply the encoder side in 8 bits. */
  quantize?: 'q8_0' | 'q4_0';
  /**
   * Threads to run on. Default: the cores (up to 8) when the page is crossOriginIsolated (the
   * threaded build is loaded), else 1 (the single-threaded build). More than 1 on a page that is
   * not isolated rejects.
   */
  threads?: number;
  /**
   * Where the model runs. 'wasm' (default): WASM SIMD on the CPU. 'webgpu': on the GPU that
   * WebGPU gives, its weights uploaded once at load: the encoder side (vision tower, projector,
   * connector) and the decoder with its KV caches. No adapter, or one short of a limit the kernels need, rejects. 'auto': WebGPU when an adapter is
   * available, else WASM (`deviceFallback` says why). `captionMany` runs on the device chosen too.
   */
  device?: 'wasm' | 'webgpu' | 'auto';
  /**
   * How the GPU stores the model's matrices (its linear layers and embedding tables) when it
   * runs on 'webgpu': 'fp32' (default), or 'fp16' where the adapter has `shader-f16` — half the
   * GPU memory and half the bytes each decoding step reads, products still computed in f32;
   * captions close to fp32's, not token-identical to transformers' f32 ones unless the
   * checkpoint itself is f16. Without `shader-f16`, fp32 (`captioner.dtype` says which). No
   * effect on WASM (there, see `quantize`).
   */
  dtype?: 'fp32' | 'fp16';
}

/** Pixels as RGBA, row by row (4 bytes per pixel). */
export interface RgbaImage {
  data: Uint8Array | Uint8ClampedArray | ArrayLike<number>;
  width: number;
  height: number;
}

/** A URL (in Node.js also a file path), PNG/JPEG bytes, RGBA pixels, or a browser image. */
export type ImageInput =
  | string
  | URL
  | Blob
  | ArrayBuffer
  | ArrayBufferView
  | RgbaImage
  | ImageData
  | HTMLImageElement
  | HTMLCanvasElement
  | OffscreenCanvas
  | ImageBitmap;

/**
 * Generation options, as transformers' `generate()` names them but camelCase. Everything except
 * `signal` goes to the WASM API unchanged: bad values reject with Rust's message, unknown keys
 * (or the other mode's) with `invalid … options: unknown field`.
 * Defaults come from the model's generation_config.json, else transformers' defaults.
 */
export interface GenerationOptions {
  maxNewTokens?: number;
  /**
   * llava: text the caption continues. SmolVLM (idefics3 / smolvlm): the user's turn — the image,
   * then this text — through the folder's chat template; the caption is the assistant's answer.
   */
  prompt?: string;
  /**
   * Called after each batch of the image's tiles went through the encoder (as many tiles per
   * batch as threads; a split SmolVLM image has up to 17, other models one). An abort takes
   * effect between batches.
   */
  onEncode?: (progress: { encoded: number; tiles: number }) => void;
  /**
   * SmolVLM: a whole conversation in transformers' chat format, holding one image, e.g.
   * `[{ role: 'user', content: [{ type: 'image' }, { type: 'text', text: 'What is written here?' }] }]`
   * (instead of `prompt`).
   */
  messages?: Array<{ role: string; content: Array<{ type: 'image' } | { type: 'text'; text: string }> }>;
  signal?: AbortSignal;
}

/** Greedy decoding (the default) or sampling; streamed token by token. */
export interface CaptionOptions extends GenerationOptions {
  /** Sample instead of taking the most likely token. */
  doSample?: boolean;
  /** Sampling: > 0. */
  temperature?: number;
  /** Sampling: keep the k most likely tokens (default 50; 0 turns it off). */
  topK?: number;
  /** Sampling: keep the smallest set of tokens whose probability reaches p, in (0, 1]. */
  topP?: number;
  /** Sampling: the random generator's seed (same seed, same caption). */
  seed?: number;
  repetitionPenalty?: number;
  noRepeatNgramSize?: number;
  minNewTokens?: number;
  /** Token id sequences never to generate. */
  badWordsIds?: number[][];
  /** 1: no beam search, whatever generation_config.json says. */
  numBeams?: 1;
  numReturnSequences?: 1;
}

/**
 * Beam search, as `generate(num_beams=…)`: chosen when `numBeams` (given, or the model's
 * generation_config.json value) is above 1; sampling options then apply to the beams (beam
 * sampling with `doSample`), and so do the logits processors.
 * Streams the best running hypothesis after each step (`provisional: true`), then the final one.
 */
export interface BeamSearchOptions extends Omit<CaptionOptions, 'numBeams' | 'numReturnSequences'> {
  /** Beams kept at each step (default 1). */
  numBeams?: number;
  /** Score = Σ log p / length ** lengthPenalty (default 1). */
  lengthPenalty?: number;
  /** true: stop once numBeams hypotheses are finished; false (default): transformers' heuristic; 'never'. */
  earlyStopping?: boolean | 'never';
  /** How many hypotheses `sequences` holds (≤ numBeams; default 1). */
  numReturnSequences?: number;
}

/** Beam search's best hypothesis so far (`provisional: true`), or the final best (`false`). */
export interface ProvisionalEvent {
  provisional: boolean;
  text: string;
  tokenIds: number[];
}

/** An event of `captionMany`: which image it belongs to, and the event. */
export type BatchEvent = { index: number } & (TokenEvent | ProvisionalEvent);

export interface BatchBeamResult extends BeamHypothesis {
  sequences: BeamHypothesis[];
}

export interface BeamHypothesis {
  text: string;
  tokenIds: number[];
  /** Sum of the new tokens' log-probabilities / length ** lengthPenalty. */
  score: number;
}

export interface BeamSearchResult extends BeamHypothesis {
  /** The best `numReturnSequences` hypotheses, best first; the result itself is the first. */
  sequences: BeamHypothesis[];
  timings: { totalMs: number };
}

/** A caption in progress: iterate it for tokens as they are generated; `result` resolves at the end. */
export interface CaptionRun<R = CaptionResult, E = TokenEvent> extends AsyncIterable<E> {
  /**
   * Resolves with the caption; rejects with the Rust error's message, an AbortError, or — when the
   * WASM instance trapped during the call — an error named `WasmcapCrashError`: the captioner then
   * restarts its worker and reloads the model, and later calls wait for that and run.
   */
  readonly result: Promise<R>;
  /** Stops this caption, like aborting its signal (beam search: only before it starts). */
  abort(): void;
}

export declare const CACHE_NAME: string;

/** Deletes the model files kept in the Cache API (all, or those under one folder URL). */
export declare function clearCache(baseUrl?: string | URL): Promise<boolean>;

export declare class Captioner {
  private constructor();
  /** What the model's generation_config.json sets; options not given to `caption` take these. */
  readonly generationDefaults: Readonly<BeamSearchOptions & { numBeams: number; numReturnSequences: number }>;
  /** The threads the model runs on (1: the single-threaded build). */
  readonly threads: number;
  /**
   * Why the model runs on 1 thread though more were asked: the threaded build's pool did not start
   * within `env.threadStartMs` (default 20 s; e.g. its worker script was served without
   * Cross-Origin-Embedder-Policy). null otherwise.
   */
  readonly threadsFallback: string | null;
  /** The device the model runs on: 'webgpu' or 'wasm' (see `LoadOptions.device`). */
  readonly device: 'wasm' | 'webgpu';
  /** The GPU adapter's name and backend when `device` is 'webgpu', else null. */
  readonly adapter: string | null;
  /** Why `device: 'auto'` chose 'wasm' (no WebGPU, no adapter), else null. */
  readonly deviceFallback: string | null;
  /** How the GPU stores the matrices ('fp32' or 'fp16', see `LoadOptions.dtype`) when `device` is 'webgpu', else null. */
  readonly dtype: 'fp32' | 'fp16' | null;
  /** WASM memory in bytes: its peak so far (WASM memory never shrinks) — after loading, then after each caption. */
  readonly memoryBytes: number;
  /**
   * How many times the WASM instance trapped (a bug, memory exhausted) and was replaced: its worker
   * restarted and the model loaded again from the same source (the Cache API for URLs and hub ids).
   */
  readonly restarts: number;
  /**
   * Loads a model from a hub id (`org/name`, `org/name@revision`), a 🤗-layout folder URL (a
   * relative one ends with `/` or starts with `./`) or a map of files, and starts its worker.
   */
  static fromPretrained(source: string | URL | FileMap, options?: LoadOptions): Promise<Captioner>;
  static clearCache(baseUrl?: string | URL): Promise<boolean>;
  /** Captions one image; captions run one after the other. */
  caption(image: ImageInput, options?: CaptionOptions): CaptionRun;
  /** Beam search: yields provisional best hypotheses; `result` holds the best hypotheses. */
  caption(image: ImageInput, options: BeamSearchOptions): CaptionRun<BeamSearchResult, ProvisionalEvent>;
  /** Captions several images in one batch (one encoder pass, decoded together); same captions as one by one. */
  captionMany(images: Iterable<ImageInput>, options?: CaptionOptions): CaptionRun<CaptionResult[], BatchEvent>;
  captionMany(images: Iterable<ImageInput>, options: BeamSearchOptions): CaptionRun<BatchBeamResult[], BatchEvent>;
  /** Terminates the worker and frees the model's memory. */
  dispose(): void;
}

export default Captioner;

/**
 * Node.js only (the package's `node` export): downloads what a hub id needs into the hub cache
 * (`HF_HOME` / `HF_HUB_CACHE`; `HF_HUB_OFFLINE`, `HF_TOKEN`), or finds it there, and resolves to
 * the snapshot folder — the one the `caption` CLI reads for the same id.
 */
export declare function snapshotDownload(id: string, options?: Pick<LoadOptions, 'revision' | 'remoteHost' | 'fetch' | 'signal'>): Promise<string>;
