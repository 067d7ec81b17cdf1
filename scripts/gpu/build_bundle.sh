#!/usr/bin/env bash
# Build, on a machine with PyPI, the bundle that lets stock vLLM 0.26.0 run on the device machine (an H200 image with
# python 3.12 + torch 2.11.0+cu130 and no network): the wheels GPU-VLLM.md lists, unpacked into one site folder,
# stripped of what the DeepSeek-V4 path never loads, tar | xz, split into chunks that fit one device call each.
#
#   bash scripts/gpu/build_bundle.sh [WORK]     # default WORK=/work/gpu-bundle; chunks in WORK/chunks
#
# Chunk size: a device call carries 64 MiB in all, the repository's working tree included (~20 MiB).
# Pins that matter (seen on the H200): openai 3.x imports httpx2 (absent); xgrammar >= 0.2.8 needs apache-tvm-ffi
# >= 0.1.11 while vLLM 0.26 pins 0.1.10 (TypeError in load_lib_module). transformers 5.19 (the reference's, as in
# CI) travels as a wheel beside the chunks: the image has 5.17.
set -euo pipefail
WORK=$(realpath -m "${1:-/work/gpu-bundle}")
CHUNK=${CHUNK:-30M}  # a call carries 64 MiB with the working tree, itself ~30 MiB
rm -rf "$WORK/wheels" "$WORK/extra"  # never two versions of one package (the last unpacked would win)
mkdir -p "$WORK/wheels" && cd "$WORK/wheels"
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_31_x86_64
      --platform manylinux_2_24_x86_64)
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${PLAT[@]}" -d . \
  vllm==0.26.0 pydantic==2.14.4 pydantic-core==2.50.5 'typing-extensions>=4.16' annotated-types typing-inspection \
  msgspec pyzmq cbor2 cachetools pybase64 openai==2.54.0 jiter distro sniffio openai-harmony partial-json-parser \
  'fastapi<0.137,>=0.133' 'starlette>=1.0.1' xgrammar==0.2.7 apache-tvm-ffi==0.1.10 'llguidance<1.8,>=1.7' \
  tilelang==0.1.9 z3-solver==4.15.4.0 nvidia-cutlass-dsl==4.6.0 nvidia-cutlass-dsl-libs-cu13==4.6.0 \
  nvidia-cutlass-dsl-libs-base==4.6.0 nvidia-cutlass-dsl-libs-core==4.6.0 quack-kernels==0.6.1 \
  compressed-tensors==0.17.0 loguru lark==1.2.2 depyf==0.20.0 blake3 setproctitle ijson python-json-logger \
  outlines_core==0.2.14 lm-format-enforcer==0.11.3 interegular frozendict astor dill diskcache
python3 -m pip download -q --no-deps --only-binary=:all: -d "$WORK/extra" transformers==5.19.0
rm -rf "$WORK/site" && mkdir "$WORK/site"
for w in *.whl; do unzip -o -q "$w" -d "$WORK/site"; done
cd "$WORK/site"
for d in *.data; do for s in purelib platlib; do if [ -d "$d/$s" ]; then cp -r "$d/$s/." .; fi; done; done
rm -rf ./*.data
# Never loaded on sm90 by DeepSeek-V4: FlashAttention 2 (fa3 is the sm90 one), the Rust front end, DeepGEMM's
# extension for other Pythons.
rm -f vllm/vllm_flash_attn/_vllm_fa2_C.abi3.so vllm/vllm-rs vllm/third_party/deep_gemm/_C.cpython-31[0134]-*.so
find . -name __pycache__ -prune -exec rm -rf {} +
cd "$WORK"
tar -cf - site | xz -T0 -6 > site.tar.xz
rm -rf chunks && mkdir chunks && split -b "$CHUNK" -d -a 2 site.tar.xz chunks/site.tar.xz.part
cp "$WORK"/extra/*.whl chunks/
ls -la chunks
