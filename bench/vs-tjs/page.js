// Browser half of the wasmcap-vs-transformers.js benchmark (loaded by index.html, called by
// driver.mjs through page.evaluate). One side per page: each function loads its model, warms up
// once, then times REPEATS runs of max_new_tokens = 1 and = N, and returns raw samples; the
// driver takes the medians.

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};

function summarize({ loadMs, t1, tN, encoder, tokens }) {
  const first = median(t1);
  const total = median(tN);
  const msPerToken = (total - first) / (tokens - 1);
  return {
    loadMs, encoderMs: median(encoder), firstTokenMs: first, totalMs: total, msPerToken,
    tokensPerS: 1000 / msPerToken, samples: { t1, tN, encoder },
  };
}

/**
 * wasmcap: Captioner.fromPretrained(modelUrl, { cache: false, quantize?, threads? }).
 * `threadsOption`: 'auto' passes `threads` only when pkg/index.js mentions the option (a build
 * with WASM threads); 'always' passes it anyway; 'never' never does.
 */
export async function ours({ modelUrl, imageUrl, tokens, repeats, quantize, threads, threadsOption = 'auto' }) {
  const src = await (await fetch('/pkg/index.js', { cache: 'no-store' })).text();
  if (quantize && !/\bquantize\b/.test(src)) throw new Error('pkg/index.js has no `quantize` option: pkg/ is stale, rebuild it (./build.sh)');
  const knowsThreads = /\bthreads\b/.test(src);
  const passThreads = threadsOption === 'always' || (threadsOption === 'auto' && knowsThreads);
  if (threads > 1 && !passThreads) return { na: 'n/a (single-threaded build)' };
  const { Captioner } = await import('/pkg/index.js');
  const options = { cache: false };
  if (quantize) options.quantize = quantize;
  if (passThreads) options.threads = threads;
  const t0 = performance.now();
  let captioner;
  try {
    captioner = await Captioner.fromPretrained(modelUrl, options);
  } catch (e) {
    // An option refused, or the threaded build (pkg/threads/) not there.
    if (passThreads && /thread/i.test(String(e.message))) return { na: `n/a (${e.message.slice(0, 120)})` };
    throw e;
  }
  const loadMs = performance.now() - t0;
  // A threads-aware Captioner says how many threads it got (1: the single-threaded build).
  const actualThreads = captioner.threads ?? 1;
  if (actualThreads !== threads) {
    captioner.dispose();
    return { na: `n/a (asked for ${threads} threads, runs ${actualThreads})` };
  }
  const once = async (n) => {
    const t = performance.now();
    const r = await captioner.caption(imageUrl, { maxNewTokens: n }).result;
    const ms = performance.now() - t;
    if (r.tokenIds.length !== n) throw new Error(`wasmcap produced ${r.tokenIds.length} tokens, asked for ${n} (EOS?): ${r.tokenIds}`);
    return { ms, r };
  };
  const warm = await once(tokens);
  const t1 = [], tN = [], encoder = [];
  let last;
  for (let i = 0; i < repeats; i++) {
    t1.push((await once(1)).ms);
    last = await once(tokens);
    tN.push(last.ms);
    encoder.push(last.r.timings.encoderMs);
  }
  const out = summarize({ loadMs, t1, tN, encoder, tokens });
  captioner.dispose();
  return {
    ...out, tokenIds: last.r.tokenIds, warmupTokenIds: warm.r.tokenIds, text: last.r.text,
    threadsPassed: passThreads, actualThreads, internal: last.r.timings,
    crossOriginIsolated: self.crossOriginIsolated, userAgent: navigator.userAgent,
  };
}

/**
 * transformers.js: pipeline('image-to-text', modelId, { dtype, device: 'wasm' }) with the model
 * and ONNX Runtime's wasm files served from here; generate() called on the pipeline's model with
 * the processor's pixel_values (what the pipeline does, minus decoding to text) to get token ids.
 */
export async function theirs({ modelRoot, modelId, imageUrl, tokens, repeats, dtype, threads, ortDist, ortVariant = 'asyncify' }) {
  const T = await import('/bench/vs-tjs/node_modules/@huggingface/transformers/dist/transformers.web.js');
  const { env, pipeline, RawImage } = T;
  env.allowRemoteModels = false;
  env.allowLocalModels = true;
  env.localModelPath = modelRoot;
  env.useBrowserCache = false; // as wasmcap's cache: false
  const wasm = env.backends.onnx.wasm;
  wasm.numThreads = threads;
  // The files transformers.js would take from a CDN (the asyncify build for device 'wasm'), served locally.
  const suffix = ortVariant ? `.${ortVariant}` : '';
  wasm.wasmPaths = { mjs: `${ortDist}ort-wasm-simd-threaded${suffix}.mjs`, wasm: `${ortDist}ort-wasm-simd-threaded${suffix}.wasm` };
  const t0 = performance.now();
  const pipe = await pipeline('image-to-text', modelId, { dtype, device: 'wasm' });
  const loadMs = performance.now() - t0;
  const { model, processor } = pipe;
  const once = async (n) => {
    const t = performance.now();
    const image = await RawImage.read(imageUrl);
    const inputs = await processor(image);
    const out = await model.generate({ ...inputs, max_new_tokens: n, do_sample: false, num_beams: 1 });
    const ms = performance.now() - t;
    const ids = Array.from(out.data, Number).slice(1); // drop decoder_start_token_id
    if (ids.length !== n) throw new Error(`transformers.js produced ${ids.length} tokens, asked for ${n} (EOS?): ${ids}`);
    return { ms, ids };
  };
  // The encoder alone: its ONNX session, fed the processor's pixel_values.
  const encoderOnce = async () => {
    const inputs = await processor(await RawImage.read(imageUrl));
    const t = performance.now();
    await model.sessions.model.run({ pixel_values: inputs.pixel_values.ort_tensor });
    return performance.now() - t;
  };
  const warm = await once(tokens);
  await encoderOnce();
  const t1 = [], tN = [], encoder = [];
  let last;
  for (let i = 0; i < repeats; i++) {
    t1.push((await once(1)).ms);
    last = await once(tokens);
    tN.push(last.ms);
    encoder.push(await encoderOnce());
  }
  const out = summarize({ loadMs, t1, tN, encoder, tokens });
  const text = pipe.tokenizer.decode(last.ids, { skip_special_tokens: true });
  await pipe.dispose?.();
  return {
    ...out, tokenIds: last.ids, warmupTokenIds: warm.ids, text, version: env.version,
    ortVersion: env.backends.onnx.versions?.web, numThreads: wasm.numThreads,
    crossOriginIsolated: self.crossOriginIsolated, userAgent: navigator.userAgent,
  };
}
