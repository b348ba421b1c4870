//! `wasmcap::fuzzing::image_decode` under libFuzzer (`./build.sh fuzz`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| wasmcap::fuzzing::image_decode(data));
