//! The GPU backend's kernels alone, timed: `cargo run --release --features webgpu --example
//! gpu_bench [REPEATS]` prints, for SigLIP-B/16-224's three matrix shapes, the ms and GFLOP/s of
//! `Linear`'s product on the adapter the platform gives (queued `REPEATS` times, then one
//! read-back), then the ms of the whole SigLIP-B tower on one image (forward and read-back), then
//! the tokens/s of decoding with GPT-2 (cross-attending to 196 image states) and SmolLM-135M
//! (after a 64-position prefix), each step's logits read back, as JSON lines: with f32 weights,
//! then (where the device has shader-f16) f16 ones. bench/gpu.sh runs it beside PyTorch on the
//! GPU machine.

// Native only: in the browser the same kernels run through the package.
#[cfg(target_arch = "wasm32")]
fn main() {}

#[cfg(not(target_arch = "wasm32"))]
fn main() -> std::process::ExitCode {
    let repeats = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(50usize).max(1);
    match pollster::block_on(run(repeats)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[cfg(not(target_arch = "wasm32"))]
async fn run(repeats: usize) -> wasmcap::Result<()> {
    use wasmcap::gpu::{Gpu, GpuDtype};
    // One device for both: each run's weights are its own, uploaded as the storage then set.
    let mut gpu = Gpu::new().await?;
    run_with(&gpu, repeats).await?;
    if gpu.has_f16() {
        gpu.store_weights_as(GpuDtype::F16)?;
        run_with(&gpu, repeats).await?;
    }
    Ok(())
}

#[cfg(not(target_arch = "wasm32"))]
async fn run_with(gpu: &wasmcap::gpu::Gpu, repeats: usize) -> wasmcap::Result<()> {
    use wasmcap::bench::noise;
    let weights = format!("{:?}", gpu.weights_dtype()).to_lowercase();
    for (rows, in_dim, out_dim) in [(196, 768, 768), (196, 768, 3072), (196, 3072, 768)] {
        let x = gpu.upload(&noise(rows * in_dim, 1.0), &[rows, in_dim])?;
        let w = gpu.upload_as(&noise(out_dim * in_dim, 2.0), &[out_dim, in_dim], gpu.weights_dtype())?;
        let b = gpu.upload(&noise(out_dim, 3.0), &[out_dim])?;
        // Warm-up: pipelines, allocations.
        gpu.read(&gpu.linear(&x, &w, Some(&b))?).await?;
        let start = std::time::Instant::now();
        let mut y = gpu.linear(&x, &w, Some(&b))?;
        for _ in 1..repeats {
            y = gpu.linear(&x, &w, Some(&b))?;
        }
        gpu.read(&y).await?;
        let ms = start.elapsed().as_secs_f64() * 1e3 / repeats as f64;
        let flop = 2.0 * (rows * in_dim * out_dim) as f64;
        println!(
            "{}",
            serde_json::json!({ "adapter": gpu.adapter(), "weights": weights, "shape": [rows, in_dim, out_dim], "ms": ms, "gflops": flop / ms / 1e6 })
        );
    }
    // SigLIP-B/16-224's whole vision tower (the models' code on the GPU backend), one image:
    // forward, then the states read back, as an encoder is used. Zero weights: the time does not
    // depend on them.
    use candle_core::{DType, Device, Tensor};
    let config: wasmcap::models::siglip::SiglipVisionConfig = serde_json::from_str("{}").map_err(|e| wasmcap::Error::Compute(e.to_string()))?;
    let vb = candle_nn::VarBuilder::zeros(DType::F32, &Device::Cpu);
    let tower = wasmcap::models::siglip::SiglipVisionTransformer::new(&config, vb.clone())?.to_backend(gpu)?;
    let pixels = Tensor::from_vec(noise(3 * 224 * 224, 4.0), (1, 3, 224, 224), &Device::Cpu)?;
    gpu.read(&tower.forward_on(gpu, &pixels)?).await?;
    let start = std::time::Instant::now();
    for _ in 0..repeats.min(50) {
        gpu.read(&tower.forward_on(gpu, &pixels)?).await?;
    }
    let ms = start.elapsed().as_secs_f64() * 1e3 / repeats.min(50) as f64;
    println!("{}", serde_json::json!({ "adapter": gpu.adapter(), "weights": weights, "encoder": "siglip-base-patch16-224", "ms": ms }));

    // Decoding: a step is the decoder's kernels for one token and the logits' read-back.
    const STEPS: usize = 64;
    let gpt2_config: wasmcap::models::gpt2::Gpt2Config =
        serde_json::from_value(serde_json::json!({ "add_cross_attention": true })).map_err(|e| wasmcap::Error::Compute(e.to_string()))?;
    let gpt2 = wasmcap::models::gpt2::Gpt2LMHeadModel::new(&gpt2_config, vb.pp("decoder"))?.to_backend(gpu)?;
    let states = gpu.upload(&noise(196 * 768, 5.0), &[1, 196, 768])?;
    let timed = |mut step: Box<dyn FnMut(u32) -> wasmcap::Result<wasmcap::gpu::GpuTensor> + '_>| -> wasmcap::Result<f64> {
        let mut id = 0u32;
        let start = std::time::Instant::now();
        for _ in 0..STEPS {
            let logits = gpu.read_tensor_now(&step(id)?)?;
            id = (wasmcap::captioner::argmax(&logits.flatten_all()?)? + 1) % 1000;
        }
        Ok(STEPS as f64 / start.elapsed().as_secs_f64())
    };
    for _ in 0..2 {
        let mut cache = gpt2.new_cache(gpu, Some(gpt2.cross_attention_cache(gpu, &states)?), 1);
        let tokens_per_s = timed(Box::new(|id| gpt2.next_logits(gpu, &[id], 1, &mut cache)))?;
        println!(
            "{}",
            serde_json::json!({ "adapter": gpu.adapter(), "weights": weights, "decoder": "gpt2 (cross-attention, 196 states)", "tokens_per_s": tokens_per_s })
        );
    }
    let smollm: wasmcap::models::llama::LlamaConfig = serde_json::from_value(serde_json::json!({
        "hidden_size": 576, "intermediate_size": 1536, "num_hidden_layers": 30, "num_attention_heads": 9,
        "num_key_value_heads": 3, "vocab_size": 49152, "max_position_embeddings": 2048, "rope_theta": 100000.0,
        "tie_word_embeddings": true
    }))
    .map_err(|e| wasmcap::Error::Compute(e.to_string()))?;
    let llama = wasmcap::models::llama::Llama::new(&smollm, vb.pp("lm"), vb.pp("lm_head"))?.to_backend(gpu)?;
    let prefix: Vec<u32> = (0..64).collect();
    for _ in 0..2 {
        let mut cache = llama.new_cache(gpu);
        gpu.read(&llama.last_logits(gpu, &llama.embed_on(gpu, &prefix, 1)?, prefix.len(), &mut cache)?).await?;
        let tokens_per_s = timed(Box::new(|id| llama.last_logits(gpu, &llama.embed_on(gpu, &[id], 1)?, 1, &mut cache)))?;
        println!(
            "{}",
            serde_json::json!({ "adapter": gpu.adapter(), "weights": weights, "decoder": "smollm-135m (after 64 positions)", "tokens_per_s": tokens_per_s })
        );
    }
    Ok(())
}
