#!/usr/bin/env bash
# On the GPU machine (after scripts/gpu-build.sh here, keeping
# .gpu/fixtures/qwen3-tokenizer: build with GPU_FIXTURES="qwen3-tokenizer tiny-qwen3-moe"; .gpu carried): the GPU-machine acceptance
# of text prompts and the Python bridge.
#   1. Qwen3's token ids recorded with this machine's transformers, against
#      the ids tests/tokenizer.rs holds (tests/data/qwen3-tokenizer-ids.json);
#   2. a text-prompt run (a chat) of the 48-layer qwen3-30b-a3b synthetic
#      model with that tokenizer, in Bf16, printing the generated text;
#   3. HF transformers' forward of tiny-qwen3-moe captured through the
#      Python package in float64 (CPU), float32 and bfloat16 (GPU), each
#      diffed against moetrace's CPU capture of the same prompt.
# Logs under $OUT.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-.gpu/out}
tmp=/tmp/moetrace-issue10
rm -rf "$tmp" && mkdir -p "$out" "$tmp"
fx=$PWD/.gpu/fixtures
{
    python3 -c 'import torch, transformers; print("transformers", transformers.__version__, "torch", torch.__version__, "cuda", torch.cuda.is_available())'
    echo "== 1. token ids with this machine's transformers"
    python3 tests/python/record_tokenizer_ids.py "$fx/qwen3-tokenizer" "$tmp/ids.json"
    python3 - "$tmp/ids.json" tests/data/qwen3-tokenizer-ids.json <<'PY'
import json, sys
here, held = (json.load(open(p, encoding="utf-8")) for p in sys.argv[1:3])
strip = lambda d: {k: v for k, v in d.items() if k not in ("transformers", "recorded_with")}
same = strip(here) == strip(held)
print("ids recorded here", "EQUAL" if same else "DIFFER", "to the ids the tests hold")
PY
    echo "== 2. a chat prompt through the 48-layer synthetic model"
    cat >"$tmp/chat.ron" <<RON
(
    model: Synthetic(preset: "qwen3-30b-a3b", seed: 7),
    prompt: Chat([(role: "system", content: "You are terse."), (role: "user", content: "Why do experts collapse? 为什么?")]),
    tokenizer: Path("$fx/qwen3-tokenizer"),
    generate: 16,
    backend: Cuda(device: 0, dtype: Bf16),
)
RON
    .gpu/bin/moetrace run -q --config "$tmp/chat.ron" 2>&1 | grep -v "^model:"
    echo "== 3. Hugging Face through the Python package against moetrace's CPU capture"
    prompt="1,17,423,45,300,5,77,100,2"
    cat >"$tmp/cpu.ron" <<RON
(model: Path("$fx/tiny-qwen3-moe/model"), prompt: Tokens([$prompt]), generate: 8, backend: Cpu, capture: (out_dir: "$tmp/cpu"))
RON
    .gpu/bin/moetrace run -q --config "$tmp/cpu.ron" | tail -1
    for spec in "float64 cpu" "float32 cuda" "bfloat16 cuda"; do
        set -- $spec
        echo "-- HF $1 on $2"
        python3 python/tools/record_hf.py "$fx/tiny-qwen3-moe/model" "$tmp/hf-$1" --dtype "$1" --device "$2" --prompt "$prompt" --generate 8 2>&1 | tail -2
        .gpu/bin/moetrace diff "$tmp/hf-$1" "$tmp/cpu" >"$out/diff-$1.txt" 2>&1
        echo "moetrace diff exit $?"
        grep -iE "compared|first divergence|no divergence|stages|verdict|flip" "$out/diff-$1.txt" | head -8
    done
} 2>&1 | tee "$out/issue10.log"
