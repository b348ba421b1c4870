#!/usr/bin/env bash
# wasmcap build entry point. Installs what is missing, then:
#   ./build.sh            build pkg/ (wasm-pack, --target web, release, SIMD128) and pkg/threads/
#                         (nightly, wasm threads; loaded by the JS shim on crossOriginIsolated pages)
#   ./build.sh setup      only install the toolchain (rustup targets, nightly + rust-src, wasm-bindgen-cli,
#                         wasm-pack, chromium)
#   ./build.sh test       native tests (cargo test) + browser tests (wasm-pack test, headless Chromium)
#                         + page tests (tests/browser/: demo, JS package, npm tarball in a Vite app)
#   ./build.sh test-pages build pkg/ and run only the page tests (tests/browser/*.test.mjs)
#   ./build.sh demo       build pkg/ and serve the demo page on http://127.0.0.1:8080 (COOP/COEP headers)
#   ./build.sh bench      benchmark full-size random models natively and in headless Chromium
#   ./build.sh bench --vs-transformers-js  the same model in Chromium: wasmcap vs transformers.js (bench/vs-tjs/)
#   ./build.sh bench-train  training samples/s of both architectures on full-size configs
#   ./build.sh fuzz [SECONDS] [TARGET...]  cargo-fuzz (nightly, ASan) every target in fuzz/ for SECONDS
#                         each (default 60), from fuzz/seeds/, fuzz/regressions/ (inputs that once crashed)
#                         and fuzz/corpus/; prints runs and crashes
set -euo pipefail
cd "$(dirname "$0")"

WASM_PACK_VERSION=0.15.1
# The CLI must equal the wasm-bindgen crate in Cargo.lock, or wasm-pack tries to download one.
WASM_BINDGEN_VERSION=$(awk '/^name = "wasm-bindgen"$/ { getline; gsub(/version = |"/, ""); print; exit }' Cargo.lock)

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

# Tools are only built for the tool itself: fast compile beats a fast binary here.
cargo_install_quick() {
  CARGO_PROFILE_RELEASE_LTO=off CARGO_PROFILE_RELEASE_CODEGEN_UNITS=16 CARGO_PROFILE_RELEASE_OPT_LEVEL=1 \
    cargo install "$@"
}

setup() {
  export PATH="$HOME/.cargo/bin:$PATH"
  if ! rustup target list --installed 2>/dev/null | grep -qx wasm32-unknown-unknown; then
    log "adding the wasm32-unknown-unknown target"
    rustup target add wasm32-unknown-unknown
  fi
  local apt_missing=()
  command -v chromium >/dev/null || apt_missing+=(chromium)
  command -v chromedriver >/dev/null || apt_missing+=(chromium-driver)
  command -v wasm-opt >/dev/null || apt_missing+=(binaryen)
  # Node.js ≥ 20: the JS package's tests, the page tests' driver and the test hub (tests/hub-server.mjs).
  command -v node >/dev/null || apt_missing+=(nodejs npm)
  # A Vulkan driver for the GPU backend's native tests where the machine has no GPU: Mesa's
  # lavapipe (the CPU as a Vulkan device), and the Vulkan loader.
  ldconfig -p 2>/dev/null | grep -q 'libvulkan\.so\.1' || apt_missing+=(libvulkan1)
  ls /usr/share/vulkan/icd.d/*.json >/dev/null 2>&1 || apt_missing+=(mesa-vulkan-drivers)
  if [ ${#apt_missing[@]} -gt 0 ]; then
    log "installing ${apt_missing[*]} (apt)"
    local sudo=""; [ "$(id -u)" -eq 0 ] || sudo=sudo
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${apt_missing[@]}" >/dev/null
  fi
  if [ "$(wasm-bindgen --version 2>/dev/null | awk '{print $2}')" != "$WASM_BINDGEN_VERSION" ]; then
    log "installing wasm-bindgen-cli $WASM_BINDGEN_VERSION"
    # Not --locked: its lockfile pins a yanked crate.
    cargo_install_quick wasm-bindgen-cli --version "$WASM_BINDGEN_VERSION" --force
  fi
  if [ "$(wasm-pack --version 2>/dev/null | awk '{print $2}')" != "$WASM_PACK_VERSION" ]; then
    log "installing wasm-pack $WASM_PACK_VERSION"
    cargo_install_quick wasm-pack --version "$WASM_PACK_VERSION" --locked --force
  fi
  export CHROMEDRIVER="${CHROMEDRIVER:-$(command -v chromedriver)}"
  # A suite's whole run. candle in a browser is slower than natively, but the tiny fixtures finish
  # in seconds; the GPU suite captions every fixture on SwiftShader's software WebGPU, 5-7 minutes.
  export WASM_BINDGEN_TEST_TIMEOUT="${WASM_BINDGEN_TEST_TIMEOUT:-900}"
}

# The threaded build needs a nightly (std rebuilt with atomics: -Z build-std). This date is the one
# the threaded build was verified with; an installed `nightly` of that date is used as it is.
NIGHTLY_DATE=2026-05-19
nightly_toolchain() {
  if rustc +nightly -V 2>/dev/null | grep -q "$NIGHTLY_DATE"; then echo nightly; else echo "nightly-$NIGHTLY_DATE"; fi
}

setup_threads() {
  setup
  NIGHTLY=$(nightly_toolchain)
  # Never `rustup toolchain install nightly`: that would move the channel to today's nightly.
  if ! rustc "+$NIGHTLY" -V >/dev/null 2>&1; then
    log "installing $NIGHTLY (for the threaded build)"
    rustup toolchain install "$NIGHTLY" --profile minimal
  fi
  if ! rustup component list --toolchain "$NIGHTLY" --installed | grep -q '^rust-src'; then
    log "adding rust-src to $NIGHTLY (-Z build-std)"
    rustup component add rust-src --toolchain "$NIGHTLY"
  fi
  rustup target list --toolchain "$NIGHTLY" --installed | grep -qx wasm32-unknown-unknown || rustup target add --toolchain "$NIGHTLY" wasm32-unknown-unknown
}

# pkg/threads/: the same crate with wasm threads (atomics, shared memory) and a rayon pool in Web
# Workers (wasm-bindgen-rayon); the JS shim loads it on crossOriginIsolated pages. Its own target
# dir: the flags differ, so sharing one would rebuild both every time.
build_threads() {
  setup_threads
  log "building pkg/threads/ (wasm32 + simd128 + atomics, nightly $NIGHTLY, release)"
  local target="${CARGO_TARGET_DIR:-target}-threads"
  # RUSTFLAGS replaces .cargo/config.toml's flags: simd128 and getrandom's backend are repeated.
  CARGO_TARGET_DIR="$target" \
  RUSTFLAGS="-C target-feature=+atomics,+bulk-memory,+simd128 -C link-arg=--shared-memory -C link-arg=--import-memory -C link-arg=--max-memory=4294967296 -C link-arg=--export=__wasm_init_tls -C link-arg=--export=__tls_size -C link-arg=--export=__tls_align -C link-arg=--export=__tls_base --cfg getrandom_backend=\"wasm_js\"" \
    cargo "+$NIGHTLY" build --lib --release --target wasm32-unknown-unknown --features "threads,webgpu${WASMCAP_FEATURES:+,$WASMCAP_FEATURES}" -Z build-std=panic_abort,std
  rm -rf pkg/threads
  wasm-bindgen --target web --no-typescript --out-dir pkg/threads --out-name wasmcap "$target/wasm32-unknown-unknown/release/wasmcap.wasm"
}

build_pkg() {
  setup
  log "building pkg/ (wasm32 + simd128, release)"
  # WASMCAP_FEATURES: extra crate features for both builds (`bench`: ./build.sh bench's exports).
  # `webgpu`: the GPU backend behind `device: 'webgpu'`.
  wasm-pack build --target web --release --out-dir pkg -- --features "webgpu${WASMCAP_FEATURES:+,$WASMCAP_FEATURES}"
  build_threads
  node js/assemble.mjs
}

run_tests() {
  setup
  # With the GPU backend (feature `webgpu`): tests/gpu.rs runs its kernels on Vulkan natively
  # (lavapipe without a GPU) and on WebGPU in Chromium (SwiftShader: webdriver.json's flags).
  log "native tests"
  cargo test --all-targets --features webgpu
  log "browser tests (headless Chromium)"
  # Arguments after the first `--` go to cargo, after the second to the test runner (wasm-pack
  # passes an option it does not know, and all after it, to cargo as they are: `--features`
  # before the first `--` left the runner a `--` it read as a filter, and every suite said "no
  # tests to run!" and passed).
  local log_file="${CARGO_TARGET_DIR:-target}/browser-tests.log"
  wasm-pack test --headless --chrome --release -- --features webgpu -- --nocapture 2>&1 | tee "$log_file"
  # A suite that ran nothing exits 0: every test file not gated to native code must have run in
  # Chromium, or this fails rather than pass without the browser.
  local expected ran
  expected=$(grep -L '^#!\[cfg(not(target_arch = "wasm32"))\]' tests/*.rs | wc -l)
  ran=$(grep -c "Running headless tests in Chrome" "$log_file" || true)
  if [ "$ran" -lt "$expected" ]; then
    echo "browser tests: $ran suites ran in Chromium, $expected expected (see $log_file)" >&2
    return 1
  fi
  # The benchmark exports are out of the shipped build: check that they still compile.
  cargo check --lib --target wasm32-unknown-unknown --features bench
  build_pkg
  log "Node.js tests (the npm package under node --test)"
  node --test tests/node/*.test.mjs
  page_tests
}

# Playwright (playwright-core driving Debian's Chromium; never a downloaded browser) under
# node's test runner. npm.test.mjs installs vite@7 from the npm registry, through npm's cache.
page_tests() {
  [ -f node_modules/playwright-core/package.json ] || { log "npm ci (playwright-core)"; npm ci --no-audit --no-fund; }
  log "page tests: demo, JS package, npm tarball in a fresh Vite app (headless Chromium)"
  node --test tests/browser/*.test.mjs
}

# Each target for $1 seconds; a table of runs, speed and crashes. libFuzzer's limits make an
# allocation over 2 GiB, an input slower than 10 s or an RSS over 4 GiB a failure too.
fuzz() {
  local seconds="${1:-60}"; shift || true
  setup
  NIGHTLY=$(nightly_toolchain)
  rustc "+$NIGHTLY" -V >/dev/null 2>&1 || rustup toolchain install "$NIGHTLY" --profile minimal
  command -v cargo-fuzz >/dev/null || { log "installing cargo-fuzz"; cargo_install_quick cargo-fuzz --locked; }
  export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$HOME/.cache/wasmcap/fuzz-target}"
  cd fuzz
  local targets=("$@")
  [ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo "+$NIGHTLY" fuzz list)
  log "building ${#targets[@]} fuzz targets ($NIGHTLY, ASan)"
  cargo "+$NIGHTLY" fuzz build -O
  local failed=0 rows=()
  for t in "${targets[@]}"; do
    mkdir -p "corpus/$t"
    log "fuzzing $t for ${seconds}s"
    local out="$CARGO_TARGET_DIR/fuzz-$t.log" rc=0
    local dirs=("corpus/$t" "seeds/$t")
    [ -d "regressions/$t" ] && dirs+=("regressions/$t")
    cargo "+$NIGHTLY" fuzz run -O "$t" "${dirs[@]}" -- \
      -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 -malloc_limit_mb=2048 -print_final_stats=1 >"$out" 2>&1 || rc=$?
    local runs secs
    runs=$(grep -o 'stat::number_of_executed_units: *[0-9]*' "$out" | grep -o '[0-9]*$' || echo 0)
    secs=$(grep -o 'Done [0-9]* runs in [0-9]* second' "$out" | awk '{print $5}' || true)
    if [ "$rc" -ne 0 ]; then failed=1; tail -40 "$out" >&2; fi
    rows+=("$(printf '| %-20s | %12s | %6s | %8s | %s |' "$t" "$runs" "${secs:-$seconds}" "$(( runs / (${secs:-$seconds} > 0 ? ${secs:-$seconds} : 1) ))" "$([ "$rc" -eq 0 ] && echo 0 || echo "FAILED (see $out, fuzz/artifacts/$t)")")")
  done
  printf '| %-20s | %12s | %6s | %8s | %s |\n|---|---|---|---|---|\n' target runs s runs/s crashes
  printf '%s\n' "${rows[@]}"
  return "$failed"
}

serve() {
  local port="${PORT:-8080}"
  log "serving http://127.0.0.1:$port/www/ (Ctrl-C to stop)"
  exec node www/serve.mjs "$port"
}

case "${1:-build}" in
  build) build_pkg ;;
  setup) setup_threads ;;
  test) run_tests ;;
  test-pages) build_pkg; page_tests ;;
  demo) build_pkg; serve ;;
  bench)
    shift
    # ./build.sh bench --vs-transformers-js: wasmcap vs transformers.js in Chromium (bench/vs-tjs/).
    if [ "${1:-}" = --vs-transformers-js ]; then exec bash bench/vs-tjs/run.sh "$@"; fi
    setup; exec bash bench/run.sh "$@" ;;
  bench-train) shift; exec bash bench/train.sh "$@" ;;
  fuzz) shift; fuzz "$@" ;;
  *) echo "usage: $0 [build|setup|test|test-pages|demo|bench|bench-train|fuzz]" >&2; exit 2 ;;
esac
