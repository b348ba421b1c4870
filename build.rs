//! Builds the relaxed-SIMD side module (`src/models/relaxed.rs`) for WASM builds (see
//! `src/models/relaxed_module.rs`): the same rustc, no_std, a few hundred lines, under a second.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=src/models/relaxed_module.rs");
    println!("cargo:rerun-if-changed=src/models/packed_kernel.rs");
    println!("cargo:rerun-if-changed=src/models/int8_kernel.rs");
    let arch = env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default();
    let features = env::var("CARGO_CFG_TARGET_FEATURE").unwrap_or_default();
    if arch != "wasm32" || !features.split(',').any(|f| f == "simd128") {
        return;
    }
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR")).join("relaxed_module.wasm");
    let rustc = env::var_os("RUSTC").unwrap_or_else(|| "rustc".into());
    let mut cmd = Command::new(rustc);
    cmd.args(["--edition", "2021", "--target", "wasm32-unknown-unknown", "--crate-type", "cdylib", "-C", "opt-level=3", "-C", "panic=abort"])
        .args(["-C", "target-feature=+simd128,+relaxed-simd", "-C", "link-arg=--import-memory", "-C", "link-arg=-zstack-size=0"]);
    // The threaded build's memory is shared: the side module must import it as such (it has no
    // atomics of its own, hence no feature check).
    if features.split(',').any(|f| f == "atomics") {
        cmd.args(["-C", "link-arg=--shared-memory", "-C", "link-arg=--max-memory=4294967296", "-C", "link-arg=--no-check-features"]);
    }
    cmd.arg("src/models/relaxed_module.rs").arg("-o").arg(&out);
    let status = cmd.status().expect("run rustc for the relaxed-SIMD side module");
    assert!(status.success(), "rustc failed on src/models/relaxed_module.rs");
}
