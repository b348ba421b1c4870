//! The GPU backend's kernels against their definitions, on whatever adapter the platform gives:
//! natively Vulkan (`./build.sh test` installs Mesa's lavapipe where there is no GPU), in
//! headless Chromium WebGPU on SwiftShader (webdriver.json's flags). No adapter is a failure,
//! not a skip.
#![cfg(feature = "webgpu")]

use wasmcap::gpu::Gpu;
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

async fn linear_matches_its_definition() {
    let gpu = Gpu::new().await.expect("a GPU adapter (natively: Mesa's lavapipe, which ./build.sh test installs)");
    println!("GPU adapter: {}", gpu.adapter());
    // Tiles whole and cut at every edge, k past and short of a 16-wide slice, batch dimensions,
    // with and without a bias.
    for (batch, k, n, bias) in
        [(vec![1], 64, 64, true), (vec![5], 13, 7, false), (vec![70], 100, 130, true), (vec![2, 3], 33, 65, true), (vec![197], 768, 96, false)]
    {
        let m: usize = batch.iter().product();
        let (x, w, b) = (values(m * k, 1), values(n * k, 2), values(n, 3));
        let shape: Vec<usize> = batch.iter().copied().chain([k]).collect();
        let xg = gpu.upload(&x, &shape).expect("upload x");
        let wg = gpu.upload(&w, &[n, k]).expect("upload w");
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
                    "{batch:?} × {k} → {n}, bias {bias}: y[{r}, {c}] = {} against {want}",
                    got[r * n + c]
                );
            }
        }
    }
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
}

#[cfg(not(target_arch = "wasm32"))]
#[test]
fn linear_matches_its_definition_natively() {
    pollster::block_on(linear_matches_its_definition());
}

#[cfg(not(target_arch = "wasm32"))]
#[test]
fn bad_shapes_are_errors_natively() {
    pollster::block_on(bad_shapes_are_errors_that_name_them());
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
