#!/usr/bin/env bash
# On the GPU machine: gpt-oss-20b's speed, moetrace and llama.cpp back to
# back on one card (issue 25). moetrace runs its `gpt-oss-20b` preset
# (MXFP4 experts, bf16 attention and embeddings) in Bf16, 512 prompt tokens
# + 64 generated; llama.cpp runs llama-bench (-p 512 -n 64 -fa 1 -r 3) on a
# random-weight gpt-oss GGUF of the same dimensions and types
# (python/tools/make_gpt_oss_gguf.py, written to /dev/shm), then moetrace
# runs that same GGUF too (SAME_GGUF=0: not). A token reads the same bytes
# on each side.
# Needs, built here:
#   GPU_LLAMACPP=1 GPU_LLAMACPP_LIBS=llamacpp-cuda-sm90-lib.txz bash scripts/gpu-build.sh
# then run(command: "bash scripts/gpu-gpt-oss-bench.sh", carry: [".gpu/bin/moetrace", ".gpu/llamacpp"]).
# llama-bench is linked on the machine from the libraries' own
# libllama-bench-impl.so (its main is one call), so nothing is built there.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/moetrace-out}
mkdir -p "$OUT"
L=$PWD/.gpu/llamacpp
m=$PWD/.gpu/bin/moetrace
PROMPT_LEN=${PROMPT_LEN:-512} GENERATE=${GENERATE:-64}
prompt=$(python3 -c "print(', '.join(str((i * 7919 + 13) % 200000 + 10) for i in range($PROMPT_LEN)))")
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1

moetrace_run() { # MODEL-EXPRESSION LABEL
    cat >/tmp/gpt-oss-bench.ron <<RON
(model: $1, prompt: Tokens([$prompt]), generate: $GENERATE, backend: Cuda(device: 0, dtype: Bf16))
RON
    for i in 1 2; do
        echo "== moetrace $2, run $i"
        "$m" run --config /tmp/gpt-oss-bench.ron 2>&1 | grep -E '^run:|^model:' | tee -a "$OUT/moetrace.txt"
    done
}
moetrace_run 'Synthetic(preset: "gpt-oss-20b", seed: 7)' "preset gpt-oss-20b"

work=/tmp/llamacpp-bench
rm -rf "$work" && mkdir -p "$work"
tar xJf "$L/lib.txz" -C "$work"
printf 'int llama_bench(int argc, char ** argv);\nint main(int argc, char ** argv) { return llama_bench(argc, argv); }\n' >"$work/main.cpp"
g++ -O2 "$work/main.cpp" -o "$work/llama-bench" -L"$work/lib" -lllama-bench-impl -Wl,-rpath,"$work/lib"
model=/dev/shm/gpt-oss-20b-synthetic.gguf
echo "== writing $model"
PYTHONPATH="$L/py" MOETRACE_SHARED_TOOLS="$L/tools" python3 python/tools/make_gpt_oss_gguf.py "$model" | tee "$OUT/gguf.txt"
echo "== llama-bench"
LD_LIBRARY_PATH="$work/lib" "$work/llama-bench" -m "$model" -ngl 99 -p "$PROMPT_LEN" -n "$GENERATE" -fa 1 -r 3 2>&1 |
    tee "$OUT/llama-bench.txt" | grep -E '^\||build|error' || true
# SAME_GGUF=0 leaves out moetrace's run of the GGUF (its load takes a while).
[ "${SAME_GGUF:-1}" = 0 ] || moetrace_run "Path(\"$model\")" "on the same GGUF"
rm -f "$model"
