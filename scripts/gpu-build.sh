#!/usr/bin/env bash
# Build, on this (GPU-less) machine, everything the GPU machine runs, into
# .gpu/ (kept out of git): the moetrace binary, the GPU test executables,
# and the oracle fixtures (the configs travel with the tree). Then, with the device tool:
#   run(command: "bash scripts/gpu-run.sh", carry: [".gpu"])
set -euo pipefail
cd "$(dirname "$0")/.."
rm -rf .gpu && mkdir -p .gpu/bin
cargo build --release -p cli
cp target/release/moetrace .gpu/bin/
# Each GPU test executable, by test target name.
for spec in "pipeline --features cuda --test gpu_synthetic" "pipeline --features cuda --test gpu_parity" "pipeline --features cuda --test gpu_mla" "pipeline --features cuda --test gpu_oss" "pipeline --features cuda --test gpu_fused_attention" "pipeline --features cuda --test gpu_quant" "kernels-cuda --lib" "moetrace-tests --features cuda --test gpu_oracle" "moetrace-tests --features cuda --test gpu_reference" "moetrace-tests --features cuda --test gpu_expert_parallel" "moetrace-tests --features cuda --test gpu_memory" "moetrace-tests --features cuda --test gguf_model"; do
    # shellcheck disable=SC2086
    cargo test --release -p $spec --no-run --message-format=json 2>/dev/null |
        python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["profile"]["test"]:
        print(m["executable"])' | while read -r exe; do
        name=$(basename "$exe" | sed 's/-[0-9a-f]*$//')
        cp "$exe" ".gpu/bin/test-$name"
    done
done
# The GPU benchmark (a bench target: executable name starts with gpu_forward).
cargo bench -p pipeline --features cuda --bench gpu_forward --no-run --message-format=json 2>/dev/null |
    python3 -c 'import json,sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m.get("executable") and m["target"]["name"] == "gpu_forward":
        print(m["executable"])' | while read -r exe; do cp "$exe" .gpu/bin/bench-gpu_forward; done
strip .gpu/bin/* 2>/dev/null || true
# The oracle fixtures the GPU tests read (carry holds 64 MiB in all: the
# 11 MB Qwen3 tokenizer only when GPU_FIXTURES names it).
if [ -d ../shared/fixtures ]; then
    mkdir -p .gpu/fixtures
    cp ../shared/fixtures/README.md .gpu/fixtures/
    for f in ${GPU_FIXTURES:-tiny-qwen3 tiny-qwen3-moe tiny-qwen3-moe-q4km}; do cp -r "../shared/fixtures/$f" .gpu/fixtures/; done
fi
# With GPU_BASELINE=<rev>, that revision's CLI too (.gpu/bin/moetrace-base),
# built in a temporary worktree: scripts/gpu-bench-baseline.sh runs both
# back to back (a refactor's speed against the code before it).
if [ -n "${GPU_BASELINE:-}" ]; then
    base=$(mktemp -d)
    git worktree add -q --detach "$base/tree" "$GPU_BASELINE"
    (cd "$base/tree" && CARGO_TARGET_DIR="$PWD/../target" cargo build -q --release -p cli)
    cp "$base/target/release/moetrace" .gpu/bin/moetrace-base
    strip .gpu/bin/moetrace-base 2>/dev/null || true
    git worktree remove --force "$base/tree"
    rm -rf "$base"
    echo "baseline $GPU_BASELINE: .gpu/bin/moetrace-base"
fi
# With GPU_LLAMACPP=1, llama.cpp for scripts/gpu-llamacpp.sh (the llama.cpp
# recorder on CUDA): ../shared's trimmed llama.cpp source and GGUF maker,
# and llama-cpp-python's Python files and gguf-py from the registry's sdist
# (the GPU machine has no network; it builds the libraries itself). Carry
# [".gpu/bin/moetrace", ".gpu/llamacpp"] for that run.
if [ -n "${GPU_LLAMACPP:-}" ]; then
    L=.gpu/llamacpp
    mkdir -p "$L/tools/llamacpp" "$L/py"
    # (the source only when the libraries are to be built there: carry holds 64 MiB)
    [ -n "${GPU_LLAMACPP_LIBS:-}" ] || cp ../shared/tools/llamacpp/llama.cpp-bench-src.tar.gz "$L/"
    cp ../shared/tools/llamacpp/make_gguf.py "$L/tools/llamacpp/"
    cp ../shared/tools/*.py "$L/tools/"
    sdist=$(mktemp -d)
    python3 -m pip download -q "llama-cpp-python==0.3.36" --no-deps --no-binary llama-cpp-python -d "$sdist"
    tar xzf "$sdist"/llama_cpp_python-0.3.36.tar.gz -C "$sdist"
    cp -r "$sdist/llama_cpp_python-0.3.36/llama_cpp" "$L/py/"
    rm -rf "$L/py/llama_cpp/server"
    cp -r "$sdist/llama_cpp_python-0.3.36/vendor/llama.cpp/gguf-py/gguf" "$L/py/"
    rm -rf "$sdist"
    # GPU_LLAMACPP_LIBS=ARCHIVE.txz: llama.cpp's CUDA libraries an earlier run
    # built (tar cJf of llama_cpp/lib), so the run skips the 250 s build.
    if [ -n "${GPU_LLAMACPP_LIBS:-}" ]; then cp "$GPU_LLAMACPP_LIBS" "$L/lib.txz"; fi
    du -sh "$L"
fi
ls -la .gpu/bin
# The device tool carries the working tree and .gpu, 64 MiB in all.
tree=$(git ls-files -z | xargs -0 stat -c %s 2>/dev/null | awk '{ s += $1 } END { print s }')
built=$(du -sb .gpu | cut -f1)
echo "carry: tracked files $((tree / 1048576)) MiB + .gpu $((built / 1048576)) MiB = $(((tree + built) / 1048576)) MiB of 64"
if [ $((tree + built)) -gt $((64 * 1048576)) ]; then
    echo "over the limit: carry only the executables the command runs, e.g. [\".gpu/bin/moetrace\", \".gpu/bin/test-gpu_oracle\", \".gpu/fixtures\"]"
fi
# GPU_PACK=1: the binaries and fixtures also as one xz archive (binaries
# shrink about 4x), for a run that needs more of them than 64 MiB holds:
#   run(carry: [".gpu/pack.txz"], command: "tar xJf .gpu/pack.txz -C .gpu && ...")
if [ -n "${GPU_PACK:-}" ]; then
    tar cJf .gpu/pack.txz -C .gpu bin $([ -d .gpu/fixtures ] && echo fixtures)
    echo "pack: .gpu/pack.txz $(($(stat -c %s .gpu/pack.txz) / 1048576)) MiB"
fi
