//! `wasmcap::fuzzing::torch_bin` under libFuzzer (`./build.sh fuzz`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| wasmcap::fuzzing::torch_bin(data));
