#!/usr/bin/env bash
# Prepares, on a machine with network access, the wheels benchmarks/gpu_check.py needs on a GPU machine that has
# none (Python 3.12, x86-64, torch with CUDA 13 already there); docs/gpu.md says how they travel and get installed.
#
#   .ortgpu0 .. .ortgpu4  onnxruntime-gpu (a CUDA 13 build, ~255 MB) split into five parts of ~51 MB, so that each
#                         part fits, with the working tree, into a transfer limited to 64 MiB
#   .whl                  diffusers, importlib_metadata (diffusers' one dependency the machine lacks; 8.x, since
#                         10.x also needs lazy-importer) and onnxconverter-common (the exporter's fp16 converter)
#
# All six folders are git-ignored (through .git/info/exclude). Run from anywhere inside the checkout.
# ORT_GPU_VERSION overrides the onnxruntime-gpu version (default 1.31.1).
set -euo pipefail
cd "$(git rev-parse --show-toplevel)"
ver=${ORT_GPU_VERSION:-1.31.1}
for pattern in '/.ortgpu*' '/.whl/'; do
  grep -qxF "$pattern" .git/info/exclude 2>/dev/null || echo "$pattern" >> .git/info/exclude
done
platforms=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
           --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
download() {  # download DEST NAME==VERSION...: wheels only, for CPython 3.12 on x86-64 Linux, no dependencies
  local dest=$1
  shift
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    "${platforms[@]}" -d "$dest" "$@"
}

rm -rf .ortgpu .ortgpu[0-4]
mkdir -p .ortgpu
download .ortgpu "onnxruntime-gpu==$ver"
whl=$(ls .ortgpu/onnxruntime_gpu-*.whl)
split -n 5 -d "$whl" .ortgpu/part
for i in 0 1 2 3 4; do
  mkdir -p ".ortgpu$i"
  mv ".ortgpu/part0$i" ".ortgpu$i/part"
done
basename "$whl" > .ortgpu0/name
rm -rf .ortgpu

rm -rf .whl
download .whl diffusers==0.42.1 importlib_metadata==8.7.1 onnxconverter-common==1.16.0

du -sm .ortgpu[0-4] .whl
echo "ready: carry .whl, then .ortgpu0 .. .ortgpu4 one per call, in order (docs/gpu.md)"
