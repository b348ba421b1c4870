//! The fuzz targets' bodies (`wasmcap::fuzzing`) on their seed corpora (`fuzz/seeds/<target>/`)
//! and on seeded mutations of them (bit flips, cuts, repeats, numbers made huge or negative): the
//! smoke of `./build.sh fuzz` that every test run does. A panic fails the test; errors are fine.
#![cfg(not(target_arch = "wasm32"))]

use std::path::{Path, PathBuf};

use wasmcap::loading::OwnedModelFiles;

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 as usize
    }
}

const NUMBERS: [&str; 7] = ["0", "-1", "65535", "4294967296", "18446744073709551615", "1e308", "3.5"];

fn mutate(seed: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut data = seed.to_vec();
    for _ in 0..1 + rng.next() % 3 {
        if data.is_empty() {
            break;
        }
        let at = rng.next() % data.len();
        match rng.next() % 6 {
            0 => data[at] ^= 1 << (rng.next() % 8),
            1 => data[at] = [0, 0xFF, 0x7F, 0x80, b'{', b'"'][rng.next() % 6],
            2 => data.truncate(at),
            3 => {
                let end = (at + 1 + rng.next() % 64).min(data.len());
                let chunk = data[at..end].to_vec();
                data.splice(at..at, chunk);
            }
            4 => {
                // A JSON number (or any digit run) replaced by an extreme one.
                if let Some(start) = (at..data.len()).find(|&i| data[i].is_ascii_digit()) {
                    let end = (start..data.len()).find(|&i| !data[i].is_ascii_digit()).unwrap_or(data.len());
                    data.splice(start..end, NUMBERS[rng.next() % NUMBERS.len()].bytes());
                }
            }
            _ => {
                data.remove(at);
            }
        }
    }
    data
}

/// The seeds of `target`, and the inputs that once crashed it (`fuzz/regressions/<target>/`).
fn seeds(target: &str) -> Vec<Vec<u8>> {
    let mut all = files(&format!("fuzz/seeds/{target}"));
    assert!(!all.is_empty(), "no seeds for {target}");
    all.extend(files(&format!("fuzz/regressions/{target}")));
    all
}

fn files(dir: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join(dir);
    if !dir.exists() {
        return Vec::new();
    }
    let mut paths: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    paths.sort();
    paths.iter().map(|f| std::fs::read(f).unwrap()).collect()
}

/// Runs `body` on every seed and `per_seed` mutations of each; returns the number of runs.
fn smoke(target: &str, per_seed: usize, body: impl Fn(&[u8])) -> usize {
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let mut runs = 0;
    for seed in seeds(target) {
        body(&seed);
        for _ in 0..per_seed {
            body(&mutate(&seed, &mut rng));
        }
        runs += 1 + per_seed;
    }
    println!("{target}: {runs} runs");
    runs
}

#[test]
fn parsers_survive_their_seeds_and_mutations() {
    use wasmcap::fuzzing::*;
    smoke("safetensors", 400, safetensors);
    smoke("checkpoint_index", 400, checkpoint_index);
    smoke("torch_bin", 400, torch_bin);
    smoke("preprocessor_config", 200, preprocessor_config);
    smoke("tokenizer", 60, tokenizer);
    smoke("chat_template", 300, chat_template);
}

#[test]
fn image_decoding_survives_its_seeds_and_mutations() {
    smoke("image_decode", 25, wasmcap::fuzzing::image_decode);
}

#[test]
fn model_construction_survives_its_seeds_and_mutations() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let folders = [
        OwnedModelFiles::read_dir(&fixtures.join("prefix/tiny-llava-base-v5"))
            .and_then(|f| f.with_adapter_dir(&fixtures.join("prefix/lora-r4")))
            .unwrap(),
        OwnedModelFiles::read_dir(&fixtures.join("blip/tiny-blip")).unwrap(),
        OwnedModelFiles::read_dir(&fixtures.join("idefics3/tiny-smolvlm")).unwrap(),
    ];
    let files: Vec<_> = folders.iter().map(|f| f.borrow()).collect();
    smoke("model_files", 12, |data| wasmcap::fuzzing::model_files(data, &files));
}
