#!/usr/bin/env bash
# On the GPU machine (after scripts/gpu-build.sh here, .gpu carried):
# moetrace and Hugging Face transformers at the same dimensions (synthetic
# qwen3-30b-a3b, Bf16, LAYERS layers, a 512-token prompt and 64 decode
# steps), one after the other in one session, and the ratio of their
# prefill and decode rates. LAYERS defaults to 48.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-.gpu/out}
mkdir -p "$out" /tmp/moetrace-vs-hf
layers=${LAYERS:-48}
prompt=$(python3 -c 'print(", ".join(str((i * 7919 + 13) % 151936) for i in range(512)))')
cat >/tmp/moetrace-vs-hf/run.ron <<RON
(model: Synthetic(preset: "qwen3-30b-a3b", seed: 7, layers: $layers), prompt: Tokens([$prompt]), generate: 65, backend: Cuda(device: 0, dtype: Bf16))
RON
{
    echo "layers: $layers; $(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)"
    .gpu/bin/moetrace run -q --config /tmp/moetrace-vs-hf/run.ron >/dev/null 2>&1 # warm-up
    mt=$(.gpu/bin/moetrace run -q --config /tmp/moetrace-vs-hf/run.ron 2>&1 | grep '^run:')
    echo "moetrace: $mt"
    hf=$(PYTHONUNBUFFERED=1 python3 scripts/hf_bench.py "$layers" 512 64 2>&1 | tail -1)
    echo "$hf"
    python3 - "$mt" "$hf" <<'PY'
import re, sys
mt, hf = sys.argv[1], sys.argv[2]
def rates(text, prefill_pat, decode_pat):
    p = re.search(prefill_pat, text); d = re.search(decode_pat, text)
    return (float(p.group(1)) if p else None, float(d.group(1)) if d else None)
m = rates(mt, r"prefill [0-9.]+ s, ([0-9.]+) tokens/s", r"decode \d+ steps [0-9.]+ s, ([0-9.]+) tokens/s")
h = rates(hf, r"prefill \d+ tokens [0-9.]+ s, ([0-9.]+) tokens/s", r"decode \d+ steps [0-9.]+ s, ([0-9.]+) tokens/s")
for what, a, b in (("prefill", m[0], h[0]), ("decode", m[1], h[1])):
    print(f"{what}: moetrace {a} tokens/s, hf {b} tokens/s" + (f", ratio {a / b:.2f}" if a and b else ""))
PY
} 2>&1 | tee "$out/vs-hf.log"
