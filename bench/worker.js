// bench/browser.mjs's module worker: runs benchModel / benchMemory off the page's main thread,
// where the threaded build's rayon pool may block (Atomics.wait is refused on a main thread).
// { threads, threadedBuild, relaxedSimd, call: 'benchModel' | 'benchMemory', args } → { result } | { error }
self.onmessage = async ({ data }) => {
  try {
    const wasm = data.threads > 1 || data.threadedBuild ? await import('/pkg/threads/wasmcap.js') : await import('/pkg/wasmcap.js');
    await wasm.default();
    wasm.allowRelaxedSimd(data.relaxedSimd !== false);
    if (data.threads > 1 || data.threadedBuild) {
      await wasm.initThreadPool(data.threads);
      wasm.setThreads(data.threads);
    }
    postMessage({ result: wasm[data.call](...data.args) });
  } catch (e) {
    postMessage({ error: String(e?.message ?? e) });
  }
};
