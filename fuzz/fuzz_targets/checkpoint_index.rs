//! `wasmcap::fuzzing::checkpoint_index` under libFuzzer (`./build.sh fuzz`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| wasmcap::fuzzing::checkpoint_index(data));
