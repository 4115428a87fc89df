#!/usr/bin/env bash
# On the GPU machine: the DeepSeek-V3 family at real dimensions (issue 24):
# the whole moonlight-16b-a3b (27 layers, bf16) and deepseek-v3 cut to
# LAYERS (4: the 3 dense layers and one MoE layer, FP8 projections kept
# FP8 on the device), each a 512-token prompt and 64 decode steps on
# Cuda(Bf16), nothing captured, ROUNDS (2) times each; the `run:` lines
# (prefill and decode speed) land in $OUT/deepseek-speed.txt. After
# scripts/gpu-build.sh:
#   run(command: "bash scripts/gpu-deepseek.sh", carry: [".gpu/bin/moetrace"])
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/moetrace-out}
mkdir -p "$OUT" /tmp/moetrace-deepseek
for spec in "moonlight-16b-a3b||163840" "deepseek-v3|${LAYERS:-4}|129280"; do
    IFS='|' read -r preset layers vocab <<<"$spec"
    prompt=$(python3 -c "print(', '.join(str((i * 7919 + 13) % $vocab) for i in range(512)))")
    config=/tmp/moetrace-deepseek/$preset.ron
    cat >"$config" <<RON
(
    model: Synthetic(preset: "$preset", seed: 7${layers:+, layers: $layers}),
    prompt: Tokens([$prompt]),
    generate: 65,
    backend: Cuda(device: 0, dtype: Bf16),
)
RON
    for round in $(seq "${ROUNDS:-2}"); do
        start=$(date +%s)
        line=$(.gpu/bin/moetrace run --quiet --config "$config" 2>&1 | tail -3 | tr '\n' ' ')
        echo "$preset${layers:+ (layers $layers)} round $round ($(($(date +%s) - start)) s with loading): $line" | tee -a "$OUT/deepseek-speed.txt"
    done
done
