//! `wasmcap::fuzzing::preprocessor_config` under libFuzzer (`./build.sh fuzz`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| wasmcap::fuzzing::preprocessor_config(data));
