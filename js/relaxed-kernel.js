// The relaxed-SIMD side module (src/models/relaxed.rs): instantiated once per thread on the
// WASM memory it is given; `init` answers false where the browser lacks relaxed SIMD, and
// the crate's simd128 kernels run instead.
let kernel = null;

export function wasmcap_relaxed_kernel_init(memory, bytes) {
  if (typeof WebAssembly.validate !== 'function' || !WebAssembly.validate(bytes)) return false;
  try {
    kernel = new WebAssembly.Instance(new WebAssembly.Module(bytes), { env: { memory } }).exports;
    return true;
  } catch (e) {
    console.warn('wasmcap: relaxed-SIMD kernel not used:', e);
    return false;
  }
}

export function wasmcap_relaxed_kernel_gemm(a, rows, inDim, lda, panels, nPanels, bias, c, ldc) {
  kernel.gemm(a, rows, inDim, lda, panels, nPanels, bias, c, ldc);
}

export function wasmcap_relaxed_kernel_int8_gemm(fused, a, rows, inDim, lda, panels, nPanels, c, ldc) {
  kernel.int8_gemm(fused, a, rows, inDim, lda, panels, nPanels, c, ldc);
}

export function wasmcap_relaxed_kernel_q8_groups(qs, scales, x, blocks, groups, out) {
  kernel.q8_groups(qs, scales, x, blocks, groups, out);
}
