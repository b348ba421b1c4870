//! The trainer's loss and gradients against 🤗 transformers: one batch of three captioned photos
//! (different lengths, so padding is in it) through the committed noisy fixtures, compared with
//! what `tests/fixtures/train/make_loss_fixtures.py` recorded from transformers in float64 —
//! token rows and targets exactly, the loss and every tensor's gradient norm within float32 error.
#![cfg(not(target_arch = "wasm32"))]

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::Value;
use wasmcap::architecture::family_for_arch;
use wasmcap::train::data::{load_dataset, DatasetOptions, Split};
use wasmcap::train::model::{BuildOptions, Source, TrainModel};
use wasmcap::train::run::check_batch;

fn fixture(rel: &str) -> String {
    format!("{}/tests/fixtures/{rel}", env!("CARGO_MANIFEST_DIR"))
}

fn close(ours: f64, theirs: f64, rel: f64) -> bool {
    (ours - theirs).abs() <= rel * theirs.abs().max(1e-3)
}

fn check_case(case: &Value, max_len: usize) {
    let family = family_for_arch(case["arch"].as_str().unwrap_or("cross-attention")).expect("a family the trainer knows");
    let prefix = family.training.is_some_and(|t| t.arch() == "prefix");
    let train_encoder = case["train_encoder"].as_bool().unwrap_or(false);
    let label = format!("{} (train_encoder {train_encoder})", case["model"]);
    let folder = fixture(case["model"].as_str().expect("model"));
    let model = TrainModel::build(
        Source::Model(Path::new(&folder)),
        BuildOptions { family: Some(family), train_encoder, train_decoder: prefix, lora: None, seed: 0, tokenizer: None },
    )
    .expect("fixture model builds");
    let data = load_dataset(&fixture("train/data.jsonl"), None, Split::Train, &DatasetOptions::default()).expect("data.jsonl loads");
    assert_eq!(data.samples.len(), 3, "{label}: three rows");
    let got = check_batch(&model, &data, max_len, None, train_encoder).expect("check_batch");

    // Token rows: transformers' inputs; our rows are not padded, theirs are.
    let ids = |v: &Value| -> Vec<Vec<i64>> { serde_json::from_value(v.clone()).expect("rows") };
    let (inputs, labels) = (ids(&case["input_ids"]), ids(&case["labels"]));
    for (b, row) in got.inputs.iter().enumerate() {
        let theirs: Vec<u32> = inputs[b][..row.len()].iter().map(|&t| t as u32).collect();
        assert_eq!(row, &theirs, "{label}: input row {b}");
        // transformers' labels: VED = targets at each position; Llava = the inputs, shifted inside the loss.
        let shift = usize::from(prefix);
        let want: Vec<Option<u32>> = (0..row.len()).map(|i| labels[b].get(i + shift).copied().filter(|&t| t >= 0).map(|t| t as u32)).collect();
        assert_eq!(got.labels[b], want, "{label}: targets of row {b}");
    }

    let loss = case["loss"].as_f64().expect("loss");
    assert!(close(got.loss, loss, 1e-5), "{label}: loss {} vs transformers {loss}", got.loss);
    let norm = case["grad_norm"].as_f64().expect("grad_norm");
    assert!(close(got.grad_norm, norm, 1e-4), "{label}: gradient norm {} vs transformers {norm}", got.grad_norm);

    let key = family.rename;
    let theirs: BTreeMap<String, f64> =
        case["grad_norms"].as_object().expect("grad_norms").iter().map(|(n, v)| (key(n), v.as_f64().unwrap_or(f64::NAN))).collect();
    let ours_names: Vec<&String> = got.grad_norms.keys().collect();
    let theirs_names: Vec<&String> = theirs.keys().collect();
    assert_eq!(ours_names, theirs_names, "{label}: the tensors that get gradients");
    let mut worst = (0.0, String::new());
    for (name, &t) in &theirs {
        let o = got.grad_norms[name];
        // A tensor whose true gradient is ~0 (a key bias: softmax ignores a shift of every score)
        // holds only rounding noise, so its error counts against a floor of 1e-5 × the global norm.
        let err = (o - t).abs() / t.abs().max(1e-5 * norm);
        if err > worst.0 {
            worst = (err, name.clone());
        }
    }
    assert!(
        worst.0 < 1e-3,
        "{label}: worst gradient-norm error {:.2e} at {} ({} vs transformers {})",
        worst.0,
        worst.1,
        got.grad_norms[&worst.1],
        theirs[&worst.1]
    );
    eprintln!(
        "{label}: loss {:.6} (transformers {loss:.6}), grad norm {:.4} ({norm:.4}), worst tensor {:.1e} at {}",
        got.loss, got.grad_norm, worst.0, worst.1
    );
}

#[test]
fn loss_and_gradients_equal_transformers() {
    let text = std::fs::read_to_string(fixture("train/loss.json")).expect("loss.json");
    let reference: Value = serde_json::from_str(&text).expect("loss.json parses");
    let max_len = reference["max_len"].as_u64().expect("max_len") as usize;
    let cases = reference["cases"].as_array().expect("cases");
    assert_eq!(cases.len(), 3);
    for case in cases {
        check_case(case, max_len);
    }
}
