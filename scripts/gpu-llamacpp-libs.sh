#!/usr/bin/env bash
# On the GPU machine: build llama.cpp's shared libraries with CUDA (sm_90)
# from the carried source (.gpu/llamacpp/llama.cpp-bench-src.tar.gz, which
# `GPU_LLAMACPP=1 bash scripts/gpu-build.sh` copies without
# GPU_LLAMACPP_LIBS) and pack them as .gpu/llamacpp/lib.txz, the archive
# scripts/gpu-peers.sh and scripts/gpu-llamacpp.sh read; a copy goes to
# $OUT so it comes back for later sessions (GPU_LLAMACPP_LIBS=that file).
# About 250 s on 16 cores. JOBS sets the build's parallelism (default: all
# cores), so it can run beside other work. The archive holds libllama,
# ggml's and libllama-bench-impl.so (llama-bench's main links against it).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/moetrace-out}
mkdir -p "$OUT"
L=$PWD/.gpu/llamacpp
src="$L/llama.cpp-bench-src.tar.gz"
if [ -f "$L/lib.txz" ]; then echo "llama.cpp's libraries already in $L/lib.txz"; exit 0; fi
[ -f "$src" ] || { echo "no $src: build with GPU_LLAMACPP=1 and without GPU_LLAMACPP_LIBS" >&2; exit 2; }
work=$(mktemp -d /tmp/llamacpp-build.XXXXXX)
start=$(date +%s)
tar xzf "$src" -C "$work"
(cd "$work/llama.cpp" &&
    cmake -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DGGML_CUDA=ON -DCMAKE_CUDA_ARCHITECTURES=90 \
        -DBUILD_SHARED_LIBS=ON -DGGML_NATIVE=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF \
        -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_TOOLS=ON -DLLAMA_BUILD_APP=OFF \
        -DLLAMA_OPENSSL=OFF -DGGML_CUDA_NCCL=OFF -DGGML_CCACHE=OFF -DGGML_CUDA_FA_ALL_QUANTS=OFF &&
    ninja -C build -j"${JOBS:-$(nproc)}" llama llama-bench) > "$OUT/llamacpp-build.log" 2>&1 ||
    { tail -30 "$OUT/llamacpp-build.log"; exit 1; }
mkdir -p "$work/pack/lib"
find "$work/llama.cpp/build" -name 'lib*.so*' -exec cp -P {} "$work/pack/lib/" \;
tar cJf "$L/lib.txz.part" -C "$work/pack" lib && mv "$L/lib.txz.part" "$L/lib.txz"
cp "$L/lib.txz" "$OUT/llamacpp-cuda-sm90-lib.txz"
echo "built in $(($(date +%s) - start)) s: $(ls "$work/pack/lib" | tr '\n' ' ')"
rm -rf "$work"
