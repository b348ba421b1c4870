//! The GPU backend's kernels against their definitions, on whatever adapter the platform gives:
//! natively Vulkan (`./build.sh test` installs Mesa's lavapipe where there is no GPU), in
//! headless Chromium WebGPU on SwiftShader (webdriver.json's flags). No adapter is a failure,
//! not a skip.
#![cfg(feature = "webgpu")]

mod common;

use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Activation, Init, VarBuilder};
use wasmcap::gpu::{Gpu, GpuDtype, GpuTensor};
use wasmcap::models::blip::{BlipVisionConfig, BlipVisionModel};
use wasmcap::models::siglip::{SiglipVisionConfig, SiglipVisionTransformer};
use wasmcap::models::vit::{ViTConfig, ViTModel};
use wasmcap::Error;

#[cfg(target_arch = "wasm32")]
wasm_bindgen_test::wasm_bindgen_test_configure!(run_in_browser);

/// Seeded values in [-1, 1): no zeros or repeats for a dropped term to hide behind.
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 23) as f32 - 1.0
        })
        .collect()
}

/// The storage types the device has for weights: f16 where it has `shader-f16`, which CI's
/// lavapipe does (a test of f16 that ran nowhere would pass unseen).
fn weight_dtypes(gpu: &Gpu) -> Vec<GpuDtype> {
    if gpu.adapter().contains("llvmpipe") {
        assert!(gpu.has_f16(), "lavapipe has shader-f16: {}", gpu.adapter());
    }
    println!("GPU adapter: {}, f16 weights: {}", gpu.adapter(), gpu.has_f16());
    [GpuDtype::F32].into_iter().chain(gpu.has_f16().then_some(GpuDtype::F16)).collect()
}

/// `values` as the device stores them as `dtype`.
fn stored(values: &[f32], dtype: GpuDtype) -> Vec<f32> {
    match dtype {
        GpuDtype::F32 => values.to_vec(),
        GpuDtype::F16 => values.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect(),
    }
}

async fn linear_matches_its_definition() {
    let gpu = Gpu::new().await.expect("a GPU adapter (natively: Mesa's lavapipe, which ./build.sh test installs)");
    for dtype in weight_dtypes(&gpu) {
        linear_matches_its_definition_with(&gpu, dtype).await;
    }
}

async fn linear_matches_its_definition_with(gpu: &Gpu, dtype: GpuDtype) {
    // Tiles whole and cut at every edge, k past and short of a 16-wide slice, batch dimensions,
    // with and without a bias; a decoding step's few rows with k short of (narrow) and past
    // (rows) 32 vec4s a column, their workgroups' columns cut.
    for (batch, k, n, bias) in [
        (vec![1], 64, 64, true),
        (vec![5], 13, 7, false),
        (vec![70], 100, 130, true),
        (vec![2, 3], 33, 65, true),
        (vec![197], 768, 96, false),
        (vec![4], 8, 130, false),
        (vec![3, 1], 256, 70, true),
    ] {
        let m: usize = batch.iter().product();
        let (x, w, b) = (values(m * k, 1), values(n * k, 2), values(n, 3));
        let shape: Vec<usize> = batch.iter().copied().chain([k]).collect();
        let xg = gpu.upload(&x, &shape).expect("upload x");
        let wg = gpu.upload_as(&w, &[n, k], dtype).expect("upload w");
        let w = stored(&w, dtype);
        let bg = gpu.upload(&b, &[n]).expect("upload b");
        let y = gpu.linear(&xg, &wg, bias.then_some(&bg)).expect("linear");
        let want_shape: Vec<usize> = batch.iter().copied().chain([n]).collect();
        assert_eq!(y.shape(), want_shape.as_slice());
        let got = gpu.read(&y).await.expect("read");
        assert_eq!(got.len(), m * n);
        for r in 0..m {
            for c in 0..n {
                let want = (0..k).map(|i| x[r * k + i] as f64 * w[c * k + i] as f64).sum::<f64>() + if bias { b[c] as f64 } else { 0.0 };
                let diff = (got[r * n + c] as f64 - want).abs();
                assert!(
                    diff <= 1e-5 * (1.0 + (k as f64).sqrt()),
                    "{dtype:?} weights, {batch:?} × {k} → {n}, bias {bias}: y[{r}, {c}] = {} against {want}",
                    got[r * n + c]
                );
            }
        }
    }
}

/// An f16 table: rows gathered by id (embeddings) and read back as the rounded values, odd
/// counts included (2-byte values in 4-byte words); f16 where an activation is read is an error
/// that says so, and so is f16 on a device without `shader-f16`.
async fn f16_weights_are_stored_and_read_as_f16() {
    let mut gpu = Gpu::new().await.expect("a GPU adapter");
    if !weight_dtypes(&gpu).contains(&GpuDtype::F16) {
        match gpu.store_weights_as(GpuDtype::F16) {
            Err(Error::Gpu(message)) => assert!(message.contains("shader-f16"), "{message}"),
            other => panic!("f16 weights without shader-f16: {other:?}"),
        }
        return;
    }
    let (rows, width) = (7, 5);
    let table = values(rows * width, 21).iter().map(|v| v * 300.0).collect::<Vec<_>>();
    let tg = gpu.upload_as(&table, &[rows, width], GpuDtype::F16).expect("upload f16");
    assert_eq!(tg.dtype(), GpuDtype::F16);
    let rounded = stored(&table, GpuDtype::F16);
    assert_ne!(rounded, table, "f16 rounds these values");
    assert_eq!(gpu.read(&tg).await.expect("read f16"), rounded);
    let ids = [6u32, 0, 3, 3];
    let got = gpu.read(&gpu.gather_rows(&tg, &ids).expect("gather f16")).await.expect("read");
    let want: Vec<f32> = ids.iter().flat_map(|&r| rounded[r as usize * width..][..width].to_vec()).collect();
    assert_eq!(got, want);
    let x = gpu.upload(&values(2 * width, 22), &[2, width]).expect("upload");
    match gpu.add(&x, &tg.reshape(&[rows, width]).expect("reshape")) {
        Err(Error::Gpu(message)) => assert!(message.contains("F16") && message.contains("f32"), "{message}"),
        other => panic!("an f16 tensor added: {:?}", other.map(|t| t.shape().to_vec())),
    }
    gpu.store_weights_as(GpuDtype::F16).expect("f16 weights");
    assert_eq!(gpu.weights_dtype(), GpuDtype::F16);
}

async fn bad_shapes_are_errors_that_name_them() {
    let gpu = Gpu::new().await.expect("a GPU adapter");
    let x = gpu.upload(&values(12, 4), &[3, 4]).expect("upload");
    let w = gpu.upload(&values(10, 5), &[2, 5]).expect("upload");
    match gpu.linear(&x, &w, None) {
        Err(Error::Gpu(message)) => assert!(message.contains("[3, 4]") && message.contains("[2, 5]"), "{message}"),
        other => panic!("x [3, 4] · w [2, 5]ᵀ: {:?}", other.map(|t| t.shape().to_vec())),
    }
    match gpu.upload(&values(5, 6), &[2, 3]) {
        Err(Error::Gpu(message)) => assert!(message.contains("[2, 3]"), "{message}"),
        other => panic!("5 values for [2, 3]: {:?}", other.map(|t| t.shape().to_vec())),
    }
    // No rows: an empty result, nothing dispatched.
    let empty = gpu.upload(&[], &[0, 4]).expect("upload");
    let w = gpu.upload(&values(8, 7), &[2, 4]).expect("upload");
    let y = gpu.linear(&empty, &w, None).expect("linear of no rows");
    assert_eq!(y.shape(), &[0, 2]);
    assert!(gpu.read(&y).await.expect("read").is_empty());

    // A device gone (destroyed here, as a lost one is): the next read is an error, not a hang
    // or a panic.
    let x = gpu.upload(&values(8, 8), &[2, 4]).expect("upload");
    gpu.destroy();
    let read = match gpu.linear(&x, &w, None) {
        Ok(y) => gpu.read(&y).await.map(|_| ()),
        Err(e) => Err(e),
    };
    match read {
        Err(Error::Gpu(message)) => println!("after the device is gone: {message}"),
        other => panic!("work on a destroyed device: {other:?}"),
    }
}

/// Largest |a − b| over two equally long slices.
fn max_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

fn cpu(data: &[f32], shape: &[usize]) -> Tensor {
    Tensor::from_vec(data.to_vec(), shape, &Device::Cpu).expect("length matches")
}

fn flat(t: &Tensor) -> Vec<f32> {
    t.flatten_all().and_then(|t| t.to_vec1::<f32>()).expect("f32")
}

/// Norms, residual adds and the layers' activations against candle's CPU ops.
async fn elementwise_kernels_match_candles() {
    let gpu = Gpu::new().await.expect("a GPU adapter");
    // Rows of 5 (most of the workgroup idle), 768 (three strides of 256), 1000.
    for (rows, n) in [(3, 5), (70, 768), (2, 1000)] {
        let x: Vec<f32> = values(rows * n, 11).iter().enumerate().map(|(i, v)| v * 3.0 + (i % 7) as f32).collect();
        let (w, b) = (values(n, 12), values(n, 13));
        let [xg, wg, bg] = [(&x, vec![rows, n]), (&w, vec![n]), (&b, vec![n])].map(|(v, s)| gpu.upload(v, &s).expect("upload"));
        let got = gpu.read(&gpu.layer_norm(&xg, &wg, &bg, 1e-6).expect("layer norm")).await.expect("read");
        let want = flat(&candle_nn::ops::layer_norm(&cpu(&x, &[rows, n]), &cpu(&w, &[n]), &cpu(&b, &[n]), 1e-6).expect("candle"));
        assert!(max_diff(&got, &want) < 1e-4, "layer norm {rows} × {n}: {}", max_diff(&got, &want));
        let got = gpu.read(&gpu.rms_norm(&xg, &wg, 1e-5).expect("rms norm")).await.expect("read");
        let want = flat(&candle_nn::ops::rms_norm(&cpu(&x, &[rows, n]), &cpu(&w, &[n]), 1e-5).expect("candle"));
        assert!(max_diff(&got, &want) < 1e-4, "rms norm {rows} × {n}: {}", max_diff(&got, &want));
    }
    // A residual, and a [T, D] table added to each of B images.
    let (a, b) = (values(2 * 3 * 4, 14), values(3 * 4, 15));
    let (ag, bg) = (gpu.upload(&a, &[2, 3, 4]).expect("upload"), gpu.upload(&b, &[3, 4]).expect("upload"));
    let got = gpu.read(&gpu.add(&ag, &bg).expect("add")).await.expect("read");
    assert_eq!(got, flat(&cpu(&a, &[2, 3, 4]).broadcast_add(&cpu(&b, &[3, 4])).expect("candle")));
    let got = gpu.read(&gpu.add(&ag, &ag).expect("add")).await.expect("read");
    assert_eq!(got, a.iter().map(|v| v + v).collect::<Vec<_>>());
    match gpu.add(&bg, &ag) {
        Err(Error::Gpu(message)) => assert!(message.contains("[3, 4]") && message.contains("[2, 3, 4]"), "{message}"),
        other => panic!("[3, 4] + [2, 3, 4]: {:?}", other.map(|t| t.shape().to_vec())),
    }
    // Activations on a product whose outputs reach ±60 (exp and tanh past their easy range).
    let (k, n) = (16, 40);
    let x: Vec<f32> = values(5 * k, 16).iter().map(|v| v * 4.0).collect();
    let w = values(n * k, 17);
    let (xg, wg) = (gpu.upload(&x, &[5, k]).expect("upload"), gpu.upload(&w, &[n, k]).expect("upload"));
    let product = cpu(&x, &[5, k]).matmul(&cpu(&w, &[n, k]).t().expect("t")).expect("matmul");
    for act in [Activation::GeluPytorchTanh, Activation::Gelu, Activation::Silu, Activation::Relu, Activation::Sigmoid] {
        let got = gpu.read(&gpu.linear_activated(&xg, &wg, None, Some(&act)).expect("linear")).await.expect("read");
        let want = flat(&product.apply(&act).expect("candle"));
        let worst = got.iter().zip(&want).map(|(g, w)| (g - w).abs() / (1.0 + w.abs())).fold(0.0, f32::max);
        assert!(worst < 1e-5, "{act:?}: relative error {worst}");
    }
}

/// softmax(q·kᵀ·scale + mask)·v with candle's plain ops, heads repeated for grouped queries.
fn attention_formula(q: &Tensor, k: &Tensor, v: &Tensor, (h, kv): (usize, usize), scale: f64, past: Option<usize>) -> Tensor {
    let (b, tq, hd) = q.dims3().expect("3 dims");
    let (tk, d) = (k.dim(1).expect("dim"), hd / h);
    let heads = |t: &Tensor, n: usize, len: usize| t.reshape((b, len, n, d)).and_then(|t| t.transpose(1, 2)).expect("heads");
    let repeat = |t: Tensor| t.unsqueeze(2).and_then(|t| t.expand((b, kv, h / kv, tk, d))).and_then(|t| t.reshape((b, h, tk, d))).expect("repeat");
    let (q, k, v) = (heads(q, h, tq).contiguous().expect("c"), repeat(heads(k, kv, tk)), repeat(heads(v, kv, tk)));
    let mut scores = (q.matmul(&k.t().expect("t")).expect("matmul") * scale).expect("scale");
    if let Some(past) = past {
        let mask: Vec<f32> = (0..tq).flat_map(|i| (0..tk).map(move |j| if j > past + i { f32::NEG_INFINITY } else { 0.0 })).collect();
        scores = scores.broadcast_add(&cpu(&mask, &[tq, tk])).expect("mask");
    }
    let out = candle_nn::ops::softmax_last_dim(&scores).and_then(|p| p.matmul(&v)).expect("values");
    out.transpose(1, 2).and_then(|t| t.reshape((b, tq, hd))).expect("merge")
}

async fn attention_matches_the_formula() {
    let gpu = Gpu::new().await.expect("a GPU adapter");
    // An encoder's (all keys, 12 heads of 64), grouped queries (SmolLM's 9 over 3) prefilled
    // causally and then one decoding step over a longer cache, odd head sizes; caches past the
    // kernel's 256-key chunk and heads past its 64 columns an invocation.
    for (b, tq, tk, h, kv, d, past) in [
        (2, 17, 17, 12, 12, 64, None),
        (1, 2, 600, 2, 1, 160, Some(598)),
        (1, 3, 300, 2, 2, 256, None),
        (1, 7, 7, 9, 3, 64, Some(0)),
        (2, 1, 30, 9, 3, 64, Some(29)),
        (1, 5, 9, 4, 2, 13, Some(4)),
        (3, 4, 6, 2, 1, 8, None),
    ] {
        let q: Vec<f32> = values(b * tq * h * d, 21).iter().map(|v| v * 2.0).collect();
        let (k, v) = (values(b * tk * kv * d, 22), values(b * tk * kv * d, 23));
        let [qg, kg, vg] = [(&q, [b, tq, h * d]), (&k, [b, tk, kv * d]), (&v, [b, tk, kv * d])].map(|(x, s)| gpu.upload(x, &s).expect("upload"));
        let scale = 1.0 / (d as f64).sqrt();
        let got = gpu.read(&gpu.attention(&qg, &kg, &vg, (h, kv), scale as f32, past).expect("attention")).await.expect("read");
        let want = flat(&attention_formula(&cpu(&q, &[b, tq, h * d]), &cpu(&k, &[b, tk, kv * d]), &cpu(&v, &[b, tk, kv * d]), (h, kv), scale, past));
        assert!(max_diff(&got, &want) < 1e-5, "b {b} tq {tq} tk {tk} h {h} kv {kv} d {d} past {past:?}: {}", max_diff(&got, &want));
    }
    let q = gpu.upload(&values(2 * 12, 24), &[1, 2, 12]).expect("upload");
    let k = gpu.upload(&values(3 * 8, 25), &[1, 3, 8]).expect("upload");
    match gpu.attention(&q, &k, &k, (3, 2), 1.0, None) {
        Err(Error::Gpu(message)) => assert!(message.contains("[1, 2, 12]") && message.contains("[1, 3, 8]"), "{message}"),
        other => panic!("3 query heads over 2: {:?}", other.map(|t| t.shape().to_vec())),
    }
}

/// Weights for any name: seeded by the name, around the init's constant (norm gains near 1,
/// biases near 0), so that no term of a layer can go missing unnoticed.
struct Seeded;

impl SimpleBackend for Seeded {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let base = match h {
            Init::Const(c) => c as f32,
            _ => 0.0,
        };
        let seed = name.bytes().fold(7u64, |a, b| a.wrapping_mul(31).wrapping_add(b as u64));
        let v: Vec<f32> = values(s.elem_count(), seed).iter().map(|x| base + 0.3 * x).collect();
        Tensor::from_vec(v, s, dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("no shape for {name}")
    }

    /// f32 tensors only (not a q8_0 or 16-bit form of a weight).
    fn contains_tensor(&self, name: &str) -> bool {
        use wasmcap::models::linear::{Q8_0_SCALES_SUFFIX, Q8_0_SUFFIX, STORED_16BIT};
        ![Q8_0_SUFFIX, Q8_0_SCALES_SUFFIX, STORED_16BIT].iter().any(|suffix| name.ends_with(suffix))
    }
}

/// The GPU's states against the CPU model's, from the same pixels.
async fn same_states(gpu: &Gpu, what: &str, got: GpuTensor, want: Tensor) {
    assert_eq!(got.shape(), want.dims(), "{what}");
    let (got, want) = (gpu.read(&got).await.expect("read"), flat(&want));
    let spread = want.iter().map(|v| v.abs()).fold(0.0, f32::max);
    assert!(spread > 0.5, "{what}: states too small to compare: {spread}");
    assert!(max_diff(&got, &want) < 1e-4, "{what}: max |Δ| {} (values up to {spread})", max_diff(&got, &want));
}

/// Each vision tower (patch embedding, class token and position embeddings, layers, final
/// norm) uploaded to the GPU gives the states its CPU model gives: SigLIP, ViT (query, key and
/// value without biases here) and BLIP's (one fused qkv matrix, erf GELU).
async fn vision_towers_on_the_gpu_match_the_cpu() {
    let gpu = Gpu::new().await.expect("a GPU adapter");
    let vb = || VarBuilder::from_backend(Box::new(Seeded), DType::F32, Device::Cpu);
    let pixels = cpu(&values(2 * 3 * 32 * 32, 31), &[2, 3, 32, 32]);
    let sizes = serde_json::json!({
        "hidden_size": 64, "intermediate_size": 136, "num_hidden_layers": 2, "num_attention_heads": 4,
        "image_size": 32, "patch_size": 8, "layer_norm_eps": 1e-6
    });
    let with = |extra: serde_json::Value| {
        let mut config = sizes.clone();
        config.as_object_mut().expect("object").extend(extra.as_object().expect("object").clone());
        config
    };

    let config: SiglipVisionConfig = serde_json::from_value(with(serde_json::json!({ "hidden_act": "gelu_pytorch_tanh" }))).expect("config");
    let tower = SiglipVisionTransformer::new(&config, vb()).expect("tower");
    let on_gpu = tower.to_backend(&gpu).expect("upload");
    same_states(&gpu, "SigLIP", on_gpu.forward_on(&gpu, &pixels).expect("GPU forward"), tower.forward(&pixels).expect("CPU forward")).await;

    let config: ViTConfig = serde_json::from_value(with(serde_json::json!({ "hidden_act": "gelu", "qkv_bias": false }))).expect("config");
    let tower = ViTModel::new(&config, vb()).expect("tower");
    let on_gpu = tower.to_backend(&gpu).expect("upload");
    same_states(&gpu, "ViT", on_gpu.forward_on(&gpu, &pixels).expect("GPU forward"), tower.forward(&pixels).expect("CPU forward")).await;

    let config: BlipVisionConfig = serde_json::from_value(with(serde_json::json!({ "hidden_act": "gelu" }))).expect("config");
    let tower = BlipVisionModel::new(&config, vb()).expect("tower");
    let on_gpu = tower.to_backend(&gpu).expect("upload");
    same_states(&gpu, "BLIP vision", on_gpu.forward_on(&gpu, &pixels).expect("GPU forward"), tower.forward(&pixels).expect("CPU forward")).await;
}

#[cfg(not(target_arch = "wasm32"))]
#[test]
fn linear_matches_its_definition_natively() {
    pollster::block_on(linear_matches_its_definition());
}

#[cfg(not(target_arch = "wasm32"))]
#[test]
fn f16_weights_are_stored_and_read_as_f16_natively() {
    pollster::block_on(f16_weights_are_stored_and_read_as_f16());
}

#[cfg(target_arch = "wasm32")]
#[wasm_bindgen_test::wasm_bindgen_test]
async fn f16_weights_are_stored_and_read_as_f16_in_the_browser() {
    f16_weights_are_stored_and_read_as_f16().await;
}

#[cfg(not(target_arch = "wasm32"))]
#[test]
fn bad_shapes_are_errors_natively() {
    pollster::block_on(bad_shapes_are_errors_that_name_them());
}

#[cfg(not(target_arch = "wasm32"))]
#[test]
fn elementwise_kernels_match_candles_natively() {
    pollster::block_on(elementwise_kernels_match_candles());
}

#[cfg(not(target_arch = "wasm32"))]
#[test]
fn attention_matches_the_formula_natively() {
    pollster::block_on(attention_matches_the_formula());
}

#[cfg(target_arch = "wasm32")]
#[wasm_bindgen_test::wasm_bindgen_test]
async fn elementwise_kernels_match_candles_in_the_browser() {
    elementwise_kernels_match_candles().await;
}

#[cfg(target_arch = "wasm32")]
#[wasm_bindgen_test::wasm_bindgen_test]
async fn attention_matches_the_formula_in_the_browser() {
    attention_matches_the_formula().await;
}

#[cfg(not(target_arch = "wasm32"))]
#[test]
fn vision_towers_on_the_gpu_match_the_cpu_natively() {
    pollster::block_on(vision_towers_on_the_gpu_match_the_cpu());
}

#[cfg(target_arch = "wasm32")]
#[wasm_bindgen_test::wasm_bindgen_test]
async fn vision_towers_on_the_gpu_match_the_cpu_in_the_browser() {
    vision_towers_on_the_gpu_match_the_cpu().await;
}

#[cfg(target_arch = "wasm32")]
#[wasm_bindgen_test::wasm_bindgen_test]
async fn linear_matches_its_definition_in_the_browser() {
    linear_matches_its_definition().await;
}

#[cfg(target_arch = "wasm32")]
#[wasm_bindgen_test::wasm_bindgen_test]
async fn bad_shapes_are_errors_in_the_browser() {
    bad_shapes_are_errors_that_name_them().await;
}

/// GPT-2 (cross-attention) and Llama (grouped queries, rotary positions) decoding on the GPU
/// against their CPU models, step by step: a prefill of 250 positions, then single steps past
/// the cache's first capacity (256), rows reordered and repeated midway as a beam search does;
/// every step's logits compared.
async fn decoders_on_the_gpu_match_the_cpu() {
    use wasmcap::models::backend::Cpu;
    use wasmcap::models::gpt2::{Gpt2Config, Gpt2LMHeadModel};
    use wasmcap::models::llama::{Llama, LlamaConfig};
    let gpu = Gpu::new().await.expect("a GPU adapter");
    let vb = || VarBuilder::from_backend(Box::new(Seeded), DType::F32, Device::Cpu);
    let close = |what: String, got: Vec<f32>, want: Tensor| {
        let want = flat(&want);
        let spread = want.iter().map(|v| v.abs()).fold(0.0, f32::max);
        assert!(spread > 0.5, "{what}: logits too small to compare: {spread}");
        assert!(max_diff(&got, &want) < 2e-4 * spread.max(1.0), "{what}: max |Δ| {} (logits up to {spread})", max_diff(&got, &want));
    };
    let ids = |rows: usize, t: usize, step: usize| (0..rows * t).map(|i| ((i * 37 + step * 11) % 90) as u32).collect::<Vec<_>>();

    let config: Gpt2Config = serde_json::from_value(serde_json::json!({
        "vocab_size": 90, "n_positions": 400, "n_embd": 64, "n_layer": 2, "n_head": 4, "add_cross_attention": true
    }))
    .expect("config");
    let cpu_model = Gpt2LMHeadModel::new(&config, vb().pp("decoder")).expect("GPT-2");
    let gpu_model = cpu_model.to_backend(&gpu).expect("upload");
    let states = values(2 * 10 * 64, 41);
    let cross = cpu_model.cross_attention_cache(&Cpu, &cpu(&states, &[2, 10, 64])).expect("cross K/V");
    let mut cpu_cache = cpu_model.new_cache(&Cpu, Some(cross), 2);
    let cross = gpu_model.cross_attention_cache(&gpu, &gpu.upload(&states, &[2, 10, 64]).expect("upload")).expect("cross K/V");
    let mut gpu_cache = gpu_model.new_cache(&gpu, Some(cross), 2);
    let mut rows = 2;
    for step in 0..12 {
        // A prefill of 250 positions, then steps past 256 (the cache grows), rows 1, 1 and 0
        // continuing from step 5 as beams do (each row still reads its own image).
        let t = if step == 0 { 250 } else { 1 };
        if step == 5 {
            cpu_cache = cpu_cache.select(&Cpu, &[1, 1, 0]).expect("select");
            gpu_cache = gpu_cache.select(&gpu, &[1, 1, 0]).expect("select");
            rows = 3;
        }
        let feed = ids(rows, t, step);
        let want = cpu_model.next_logits(&Cpu, &feed, rows, &mut cpu_cache).expect("CPU step");
        let got = gpu.read(&gpu_model.next_logits(&gpu, &feed, rows, &mut gpu_cache).expect("GPU step")).await.expect("read");
        close(format!("GPT-2 step {step}"), got, want);
    }

    let config: LlamaConfig = serde_json::from_value(serde_json::json!({
        "vocab_size": 90, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "max_position_embeddings": 600, "tie_word_embeddings": true
    }))
    .expect("config");
    let cpu_model = Llama::new(&config, vb().pp("model"), vb().pp("lm_head")).expect("Llama");
    let gpu_model = cpu_model.to_backend(&gpu).expect("upload");
    let (mut cpu_cache, mut gpu_cache) = (cpu_model.new_cache(&Cpu), gpu_model.new_cache(&gpu));
    let mut rows = 2;
    for step in 0..30 {
        // A prefill of 250 positions, then steps past 256.
        let t = if step == 0 { 250 } else { 1 };
        if step == 12 {
            cpu_cache = cpu_cache.select(&Cpu, &[0, 0, 1]).expect("select");
            gpu_cache = gpu_cache.select(&gpu, &[0, 0, 1]).expect("select");
            rows = 3;
        }
        let feed = ids(rows, t, step);
        let want = cpu_model.last_logits(&Cpu, &cpu_model.embed_on(&Cpu, &feed, rows).expect("embed"), t, &mut cpu_cache).expect("CPU step");
        let embeds = gpu_model.embed_on(&gpu, &feed, rows).expect("embed");
        let got = gpu.read(&gpu_model.last_logits(&gpu, &embeds, t, &mut gpu_cache).expect("GPU step")).await.expect("read");
        close(format!("Llama step {step}"), got, want);
    }
}

#[cfg(not(target_arch = "wasm32"))]
#[test]
fn decoders_on_the_gpu_match_the_cpu_natively() {
    pollster::block_on(decoders_on_the_gpu_match_the_cpu());
}

#[cfg(target_arch = "wasm32")]
#[wasm_bindgen_test::wasm_bindgen_test]
async fn decoders_on_the_gpu_match_the_cpu_in_the_browser() {
    decoders_on_the_gpu_match_the_cpu().await;
}

/// A captioner on the GPU, through the step-by-step encoding and the decoding steps the JS
/// worker awaits (`encode_step_async`, `next_token_async`, `beam_search_run_async`), against 🤗
/// transformers' fixtures: first-step logits within the CPU paths' tolerance (`scale`: in units
/// of that, e.g. the logits' std), greedy and beam ids identical.
struct Check<'a> {
    label: String,
    pixels: wasmcap::preprocess::Pixels,
    options: wasmcap::CaptionOptions,
    logits: Option<(&'a Tensor, f32)>,
    greedy: Option<Vec<u32>>,
    beam: Option<(wasmcap::BeamOptions, Vec<u32>)>,
}

async fn encoded(c: &wasmcap::Captioner, pixels: &wasmcap::preprocess::Pixels, options: &wasmcap::CaptionOptions) -> wasmcap::CaptionRun {
    let mut run = c.start_encoding(pixels, options).expect("start encoding");
    while !run.is_encoded() {
        c.encode_step_async(&mut run, 4).await.expect("encode on the GPU");
    }
    c.finish_encoding_awaited(run).expect("finish encoding")
}

async fn check_on_gpu(gpu: &Gpu, c: &wasmcap::Captioner, check: Check<'_>) {
    let Check { label, pixels, options, logits, greedy, beam } = check;
    let before = gpu.kernels_queued();
    if let Some((want, scale)) = logits {
        let first = wasmcap::CaptionOptions { max_new_tokens: Some(1), ..options.clone() };
        let got = c.first_step_logits_of_async(encoded(c, &pixels, &first).await).await.expect("logits");
        let diff = common::max_abs_diff(&got.flatten_all().unwrap(), &want.flatten_all().unwrap());
        common::report(&format!("{label} first-step logits max-abs, on the GPU ({:?} weights)", gpu.weights_dtype()), diff);
        assert!(diff / scale <= common::STATE_TOL, "{label}: first-step logits differ by {diff} (scale {scale})");
    }
    if let Some(want) = greedy {
        let mut run = encoded(c, &pixels, &options).await;
        while c.next_token_async(&mut run).await.expect("next token").is_some() {}
        assert_eq!(c.finish(&run).token_ids, want, "{label}: greedy ids on the GPU ({:?} weights)", gpu.weights_dtype());
    }
    if let Some((beams, want)) = beam {
        let best = c.beam_search_run_async(encoded(c, &pixels, &options).await, &beams, |_, _| {}).await.expect("beam search");
        assert_eq!(best[0][0].token_ids, want, "{label}: {} beams on the GPU ({:?} weights)", beams.num_beams, gpu.weights_dtype());
    }
    assert!(gpu.kernels_queued() > before, "{label}: nothing ran on the GPU");
}

/// A captioner on the GPU, encoder side and decoder.
fn on_gpu(gpu: &Arc<Gpu>, files: wasmcap::loading::ModelFiles<'_>) -> wasmcap::Captioner {
    let mut c = wasmcap::Captioner::from_files(files).expect("captioner");
    c.use_gpu(gpu.clone()).expect("the model uploads");
    assert!(c.decodes_on_gpu(), "the decoder runs on the GPU");
    c
}

/// First-step logits with f16 weights from an f32 checkpoint, in units of the f32 paths'
/// tolerance times the logits' std: rounding the weights to f16 (2⁻¹¹ relative) moves them, and
/// greedy ids may then part from transformers' (f32) ones where two logits are close. Measured
/// on lavapipe: max-abs up to 0.028 std (Llava), 0.087 std for BLIP with its prompt (whose f32
/// path is the loosest too); a kernel reading the wrong f16 is off by the whole spread.
const F16_LOGITS_TOL: f32 = 100.0;

/// How first-step logits are compared on `gpu`, and whether ids must be transformers': exactly
/// (the f32 tolerance `f32_scale`) where the weights are stored as they are in the checkpoint
/// (f32 storage, or an f16 checkpoint such as tiny-ved-v5 stored as f16), else relative to
/// their spread.
fn compared(gpu: &Gpu, files: &wasmcap::loading::ModelFiles<'_>, logits: &Tensor, f32_scale: f32) -> (f32, bool) {
    let f16_checkpoint = || {
        let header_len = u64::from_le_bytes(files.weights[..8].try_into().expect("a safetensors header")) as usize;
        let header: serde_json::Value = serde_json::from_slice(&files.weights[8..8 + header_len]).expect("a safetensors header");
        let tensors = header.as_object().expect("a map").iter().filter(|(name, _)| *name != "__metadata__");
        tensors.map(|(_, t)| t["dtype"].as_str()).all(|dtype| dtype == Some("F16"))
    };
    if gpu.weights_dtype() == GpuDtype::F32 || f16_checkpoint() {
        return (f32_scale, true);
    }
    let std = logits.flatten_all().and_then(|t| t.var(0)).and_then(|v| v.sqrt()).and_then(|s| s.to_scalar::<f32>()).expect("std");
    (F16_LOGITS_TOL * std, false)
}

async fn captioners_on_the_gpu_match_transformers() {
    let dtypes = weight_dtypes(&Gpu::new().await.expect("a GPU adapter"));
    for dtype in dtypes {
        let mut gpu = Gpu::new().await.expect("a GPU adapter");
        gpu.store_weights_as(dtype).expect("weights");
        captioners_on_the_gpu_match_transformers_with(Arc::new(gpu)).await;
    }
}

async fn captioners_on_the_gpu_match_transformers_with(gpu: Arc<Gpu>) {
    use common::{ids, image, PHOTOS, PREFIX_PROMPTS};
    use wasmcap::preprocess::Pixels;
    use wasmcap::CaptionOptions;
    let whole = |t: &Tensor| Pixels::whole(t.clone());

    // SigLIP / ViT + GPT-2 (VisionEncoderDecoder).
    for fx in common::fixtures() {
        let c = on_gpu(&gpu, fx.files());
        let tensors = fx.reference_tensors();
        for name in PHOTOS {
            let greedy = CaptionOptions { max_new_tokens: Some(fx.max_new_tokens()), ..Default::default() };
            let ours = c.pixel_values_from_bytes(image(name)).unwrap();
            let beam = (fx.name == "tiny-vit-gpt2").then(|| (c.default_beam_options(), ids(&fx.reference()["images"][name]["default_ids"])));
            let label = format!("{} {name}", fx.name);
            let want = &tensors[&format!("logits.{name}")];
            let (scale, exact) = compared(&gpu, &fx.files(), want, 1.0);
            let beam = beam.filter(|_| exact);
            let logits = Some((want, scale));
            check_on_gpu(
                &gpu,
                &c,
                Check {
                    label: label.clone(),
                    pixels: whole(&tensors[&format!("pixel_values.{name}")]),
                    options: CaptionOptions::default(),
                    logits,
                    greedy: None,
                    beam: None,
                },
            )
            .await;
            if exact {
                let check = Check {
                    label: label.clone(),
                    pixels: ours.clone(),
                    options: greedy,
                    logits: None,
                    greedy: Some(fx.greedy_ids(name)),
                    beam: None,
                };
                check_on_gpu(&gpu, &c, check).await;
            }
            // generate()'s defaults: nlpconnect's generation_config.json asks for 4 beams.
            if beam.is_some() {
                check_on_gpu(&gpu, &c, Check { label, pixels: ours, options: c.default_options(), logits: None, greedy: None, beam }).await;
            }
        }
        // Both photos as one batch through the async batch calls (the worker's on WebGPU):
        // each image's ids as one by one.
        if compared(&gpu, &fx.files(), &tensors[&format!("logits.{}", PHOTOS[0])], 1.0).1 {
            let batch = Pixels::cat(&PHOTOS.map(|name| c.pixel_values_from_bytes(image(name)).unwrap())).unwrap();
            let before = gpu.kernels_queued();
            let greedy = CaptionOptions { max_new_tokens: Some(fx.max_new_tokens()), ..Default::default() };
            let got = c.caption_many_async(&batch, &greedy, |_, _| {}).await.expect("caption_many_async");
            let want: Vec<Vec<u32>> = PHOTOS.iter().map(|name| fx.greedy_ids(name)).collect();
            assert_eq!(got.iter().map(|c| c.token_ids.clone()).collect::<Vec<_>>(), want, "{}: caption_many_async on the GPU", fx.name);
            if fx.name == "tiny-vit-gpt2" {
                let found = c.beam_search_many_async(&batch, &c.default_options(), &c.default_beam_options(), |_, _| {}).await.expect("beam search");
                let want: Vec<Vec<u32>> = PHOTOS.iter().map(|name| ids(&fx.reference()["images"][name]["default_ids"])).collect();
                assert_eq!(found.iter().map(|h| h[0].token_ids.clone()).collect::<Vec<_>>(), want, "beam_search_many_async on the GPU");
            }
            assert!(gpu.kernels_queued() > before, "{}: the batch ran on the GPU", fx.name);
        }
    }

    // SigLIP + projector + Llama (Llava), LoRA merged ahead and at load.
    for case in common::prefix_cases() {
        let c = on_gpu(&gpu, case.files());
        let tensors = case.reference_tensors();
        for name in PHOTOS {
            let pixels = whole(&tensors[&format!("pixel_values.{name}")]);
            for (key, prompt) in PREFIX_PROMPTS {
                let want = case.greedy_ids(name, key);
                let options = CaptionOptions { prompt: prompt.map(str::to_string), max_new_tokens: Some(want.len()), ..Default::default() };
                let logits = &tensors[&format!("logits.{name}.{key}")];
                let (scale, exact) = compared(&gpu, &case.files(), logits, 1.0);
                let label = format!("{} {name} {key}", case.name);
                let check =
                    Check { label, pixels: pixels.clone(), options, logits: Some((logits, scale)), greedy: exact.then_some(want), beam: None };
                check_on_gpu(&gpu, &c, check).await;
            }
        }
    }

    // BLIP's vision model + BERT decoder: its fixture's logits compared in units of their std.
    let fx = common::blip();
    let (reference, tensors) = (fx.reference(), fx.reference_tensors());
    let c = on_gpu(&gpu, fx.files());
    let beams = wasmcap::BeamOptions { num_beams: reference["num_beams"].as_u64().unwrap() as usize, ..Default::default() };
    for name in PHOTOS {
        for key in ["noprompt", "prompt"] {
            let want = &reference["images"][name][key];
            let options = CaptionOptions {
                prompt: reference["prompts"][key].as_str().map(str::to_string),
                max_new_tokens: Some(reference["max_new_tokens"].as_u64().unwrap() as usize),
                ..Default::default()
            };
            let logits = &tensors[&format!("logits.{name}.{key}")];
            let std = logits.var(0).unwrap().sqrt().unwrap().to_scalar::<f32>().unwrap();
            let (scale, exact) = compared(&gpu, &fx.files(), logits, std);
            let prompt_len = want["decoder_input_ids"].as_array().unwrap().len();
            let beam = (beams.clone(), ids(&want["beam_sequence"])[prompt_len..].to_vec());
            let pixels = whole(&tensors[&format!("pixel_values.{name}")]);
            let check = Check {
                label: format!("blip {name} {key}"),
                pixels,
                options,
                logits: Some((logits, scale)),
                greedy: exact.then(|| ids(&want["greedy_ids"])),
                beam: exact.then_some(beam),
            };
            check_on_gpu(&gpu, &c, check).await;
        }
    }

    // SmolVLM (Idefics3): tiles of a split image and the whole one, the connector's pixel
    // shuffle on the GPU.
    let fx = common::smolvlm();
    let (reference, tensors) = (fx.reference(), fx.reference_tensors());
    let beams = wasmcap::BeamOptions { num_beams: reference["num_beams"].as_u64().unwrap() as usize, ..Default::default() };
    for mode in ["split", "unsplit"] {
        let mut preprocessor: serde_json::Value = serde_json::from_slice(fx.preprocessor).unwrap();
        preprocessor["do_image_splitting"] = (mode == "split").into();
        let bytes = serde_json::to_vec(&preprocessor).unwrap();
        let c = on_gpu(&gpu, fx.files(Some(&bytes)));
        for name in ["astronaut.png", "chelsea.jpg", "chelsea_portrait.png"] {
            let want = &reference["images"][name][mode];
            let grids = c.pixel_values_from_bytes(image(name)).unwrap().grids().to_vec();
            let pixels = Pixels::tiled(tensors[&format!("pixel_values.{name}.{mode}")].clone(), grids).unwrap();
            let options = CaptionOptions {
                prompt: Some(reference["prompt"].as_str().unwrap().to_string()),
                max_new_tokens: Some(reference["max_new_tokens"].as_u64().unwrap() as usize),
                ..Default::default()
            };
            let logits = &tensors[&format!("logits.{name}.{mode}")];
            let (scale, exact) = compared(&gpu, &fx.files(Some(&bytes)), logits, 1.0);
            let beam = exact.then(|| (beams.clone(), ids(&want["beam_ids"])));
            let greedy = exact.then(|| ids(&want["greedy_ids"]));
            let check = Check { label: format!("idefics3 {name} {mode}"), pixels, options, logits: Some((logits, scale)), greedy, beam };
            check_on_gpu(&gpu, &c, check).await;
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
#[test]
fn captioners_on_the_gpu_match_transformers_natively() {
    pollster::block_on(captioners_on_the_gpu_match_transformers());
}

#[cfg(target_arch = "wasm32")]
#[wasm_bindgen_test::wasm_bindgen_test]
async fn captioners_on_the_gpu_match_transformers_in_the_browser() {
    captioners_on_the_gpu_match_transformers().await;
}
