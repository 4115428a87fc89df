#!/usr/bin/env bash
# On the GPU machine: this build against a baseline revision's, back to
# back on one card (a refactor must keep decode and prefill within 3%).
# Needs `GPU_BASELINE=<rev> bash scripts/gpu-build.sh` first (it builds
# .gpu/bin/moetrace-base); then
#   run(command: "bash scripts/gpu-bench-baseline.sh", carry: [".gpu/bin/moetrace", ".gpu/bin/moetrace-base"])
# Each preset (PRESETS: qwen3-30b-a3b and qwen3-30b-a3b-q4km) runs a
# 512-token prompt and 64 decode steps in Bf16, nothing captured, ROUNDS
# (3) times alternating base and new; the summary lines are printed and
# kept under $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/moetrace-out}
mkdir -p "$OUT" /tmp/moetrace-baseline
prompt=$(python3 -c 'print(", ".join(str((i * 7919 + 13) % 151936) for i in range(512)))')
for preset in ${PRESETS:-qwen3-30b-a3b qwen3-30b-a3b-q4km}; do
    config=/tmp/moetrace-baseline/$preset.ron
    cat >"$config" <<RON
(
    model: Synthetic(preset: "$preset", seed: 7),
    prompt: Tokens([$prompt]),
    generate: 65,
    backend: Cuda(device: 0, dtype: Bf16),
)
RON
    for round in $(seq "${ROUNDS:-3}"); do
        for which in moetrace-base moetrace; do
            line=$(".gpu/bin/$which" run --quiet --config "$config" 2>&1 | grep '^run:' || true)
            echo "$preset round $round $which: $line" | tee -a "$OUT/baseline.txt"
        done
    done
done
