// The Node.js host of worker.js: a worker_threads Worker dressed as the module Web Worker that
// worker.js expects (`self` an EventTarget receiving 'message' events, a global `postMessage`),
// and the wasm module's bytes read from disk (Node's fetch takes no file: URLs). No model logic.
import { parentPort } from 'node:worker_threads';
import { readFile } from 'node:fs/promises';

const self = new EventTarget();
self.crossOriginIsolated = false;
globalThis.self = self;
globalThis.postMessage = (message, transfer) => parentPort.postMessage(message, transfer);
globalThis.wasmcapModuleBytes = await readFile(new URL('./wasmcap_bg.wasm', import.meta.url));
await import('./worker.js');
parentPort.on('message', (data) => {
  const event = new MessageEvent('message', { data });
  self.onmessage?.(event);
  self.dispatchEvent(event);
});
