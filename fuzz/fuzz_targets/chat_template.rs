//! `wasmcap::fuzzing::chat_template` under libFuzzer (`./build.sh fuzz`).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| wasmcap::fuzzing::chat_template(data));
