// The relaxed-SIMD GEMM side module (src/models/packed.rs): instantiated once per thread on the
// WASM memory it is given; `init` answers false where the browser lacks relaxed SIMD, and
// the crate's simd128 kernel runs instead.
let kernel = null;

export function wasmcap_relaxed_kernel_init(memory, bytes) {
  if (typeof WebAssembly.validate !== 'function' || !WebAssembly.validate(bytes)) return false;
  try {
    kernel = new WebAssembly.Instance(new WebAssembly.Module(bytes), { env: { memory } }).exports.gemm;
    return true;
  } catch (e) {
    console.warn('wasmcap: relaxed-SIMD kernel not used:', e);
    return false;
  }
}

export function wasmcap_relaxed_kernel_gemm(a, rows, inDim, panels, nPanels, bias, c) {
  kernel(a, rows, inDim, panels, nPanels, bias, c);
}
