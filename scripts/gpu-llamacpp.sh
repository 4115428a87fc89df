#!/usr/bin/env bash
# On the GPU machine: llama.cpp's CUDA backend checked stage by stage
# (issue 23). Builds llama.cpp's libraries with CUDA from the carried
# source, writes a random-weight qwen3moe GGUF at Qwen3-30B-A3B dimensions,
# records llama.cpp (all layers offloaded) with moetrace_capture.llamacpp,
# and checks the capture against moetrace's CUDA F32 reference, timed; the
# report and its per-stage table (--by-stage) land in $OUT/check.txt.
# Needs `GPU_LLAMACPP=1 bash scripts/gpu-build.sh` first; then
#   run(command: "bash scripts/gpu-llamacpp.sh", carry: [".gpu/bin/moetrace", ".gpu/llamacpp"])
# (GPU_LLAMACPP_LIBS=lib.txz on that build: the libraries an earlier run built, no 250 s build here.)
# TYPE (q4_k_m, bf16, q8_0), LAYERS (48), PROMPT_LEN (64), GENERATE (4),
# REFERENCE (the check's reference backend) override the defaults.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/moetrace-out}
mkdir -p "$OUT"
L=$PWD/.gpu/llamacpp
TYPE=${TYPE:-q4_k_m} LAYERS=${LAYERS:-48} PROMPT_LEN=${PROMPT_LEN:-64} GENERATE=${GENERATE:-4}
REFERENCE=${REFERENCE:-Cuda(device: 0, dtype: F32)}
work=/tmp/llamacpp
rm -rf "$work" && mkdir -p "$work/py"
mkdir -p "$work/py/llama_cpp/lib"
# llama.cpp's CUDA libraries: the carried archive, or built here (250 s).
OUT="$OUT" bash scripts/gpu-llamacpp-libs.sh
tar xJf "$L/lib.txz" -C "$work/py/llama_cpp"
# llama-cpp-python's Python files over the libraries.
cp -r "$L/py/llama_cpp" "$L/py/gguf" "$work/py/"
export PYTHONPATH="$work/py:$PWD/python"
# The GPU machine's Python (a venv) crashed inside llama_model_load_from_file
# (a std::function call while printing hparams) unless the system libstdc++
# is loaded first; llama-bench from the same build did not.
LD_PRELOAD=$(ldconfig -p | grep -m1 'libstdc++.so.6 ' | awk '{print $NF}')
# Libraries from an archive have no build tree for their RUNPATH to find.
LD_LIBRARY_PATH="$work/py/llama_cpp/lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
export LD_PRELOAD LD_LIBRARY_PATH
model=/dev/shm/moetrace-llamacpp-$TYPE-$LAYERS.gguf
echo "== writing $model ($TYPE, $LAYERS layers)"
python3 "$L/tools/llamacpp/make_gguf.py" "$model" --type "$TYPE" --layers "$LAYERS"
prompt=$(python3 -c "print(','.join(str((i * 7919 + 13) % 151000 + 10) for i in range($PROMPT_LEN)))")
capture=/dev/shm/moetrace-llamacpp-capture
echo "== recording llama.cpp CUDA: $PROMPT_LEN prompt tokens, $GENERATE generated"
start=$(date +%s)
python3 -m moetrace_capture.llamacpp "$model" "$capture" --prompt "$prompt" --generate "$GENERATE" --gpu-layers 99 \
    2>&1 | tee "$OUT/record.log" | tail -5
echo "recorded in $(($(date +%s) - start)) s; $(du -sh "$capture" | cut -f1)"
echo "== check against $REFERENCE"
start=$(date +%s)
set +e
.gpu/bin/moetrace check "$capture" --model "$model" --reference "$REFERENCE" -q --by-stage --html "$OUT/check.html" > "$OUT/check.txt"
code=$?
set -e
echo "check exit $code in $(($(date +%s) - start)) s"
sed -n '/^stage /,$p' "$OUT/check.txt"
rm -rf "$capture" "$model"
