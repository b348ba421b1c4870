#!/usr/bin/env bash
# The GPU backend's kernels beside PyTorch CUDA on the same card, on the GPU machine (`device`
# tool): build here with `cargo build --release --features webgpu --example gpu_bench`, copy the
# binary to .gl/gpu_bench with the Vulkan loader's .debs (see the device notes), carry .gl, then
# run `bash bench/gpu.sh [REPEATS]` there. Prints JSON lines: ours (Vulkan) then PyTorch's.
set -euo pipefail
cd "$(dirname "$0")/.."
for f in .gl/*.deb; do dpkg -x "$f" /; done
ldconfig
export VK_DRIVER_FILES=${VK_DRIVER_FILES:-/usr/local/nvidia/share/vulkan/icd.d/nvidia_icd.json}
.gl/gpu_bench "${1:-50}"
python3 bench/gpu_torch.py "${1:-50}"
