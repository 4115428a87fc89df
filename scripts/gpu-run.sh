#!/usr/bin/env bash
# Run on the GPU machine from the checkout root, after scripts/gpu-build.sh
# here and with .gpu carried. Runs every GPU test executable with
# MOETRACE_GPU=1, writes logs under $OUT (when set), and prints a table last.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-.gpu/out}
mkdir -p "$out"
export MOETRACE_GPU=1 MOETRACE_FIXTURES="$PWD/.gpu/fixtures"
{
    echo "date: $(date -u +%F)"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>&1 | head -1 | sed 's/^/gpu: /'
} | tee "$out/machine.txt"
results=()
for exe in .gpu/bin/test-*; do
    name=$(basename "$exe")
    start=$(date +%s%N)
    if "$exe" --test-threads=1 --nocapture >"$out/$name.log" 2>&1; then status=pass; else status=FAIL; fi
    secs=$(awk -v a="$start" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')
    passed=$(grep -o '[0-9]* passed' "$out/$name.log" | tail -1)
    skipped=$(grep -c SKIPPED "$out/$name.log")
    results+=("$(printf '%-32s %-5s %-12s skipped:%-3s %6ss' "$name" "$status" "$passed" "$skipped" "$secs")")
done
# Benchmarks, when asked for (they take a minute): MOETRACE_BENCH=1.
if [ -n "${MOETRACE_BENCH:-}" ] && [ -x .gpu/bin/bench-gpu_forward ]; then
    .gpu/bin/bench-gpu_forward 2>&1 | tee "$out/bench-gpu_forward.log"
fi
# The acceptance runs through the CLI, as a user would make them.
for args in "run -q --config configs/cuda-f32.ron" "bisect -q --config configs/bisect-cuda.ron"; do
    name=$(echo "$args" | cut -d' ' -f1)
    # shellcheck disable=SC2086
    .gpu/bin/moetrace $args >"$out/cli-$name.log" 2>&1
    code=$?
    results+=("$(printf '%-32s exit %-3s %s' "moetrace $name" "$code" "$(grep -m1 -E 'first divergence|no divergence|^run:' "$out/cli-$name.log")")")
done
# GPU out of memory through the CLI: the preset doubled to 96 layers in F32
# (about 244 GB, more than any single card) must exit 2 with the numbers,
# before uploading anything.
cat >"$out/oom.ron" <<'RON'
(model: Synthetic(preset: "qwen3-30b-a3b", seed: 7, layers: 96), prompt: Tokens([1, 2, 3]), backend: Cuda(device: 0, dtype: F32))
RON
.gpu/bin/moetrace run -q --config "$out/oom.ron" >"$out/cli-oom.log" 2>&1
code=$?
results+=("$(printf '%-32s exit %-3s %s' "moetrace run (F32, 244 GB)" "$code" "$(grep -m1 -o 'GPU out of memory.*free of [0-9.]* GB' "$out/cli-oom.log")")")
[ "$code" = 2 ] || results+=("FAIL: the out-of-memory run must exit 2")
echo
echo "GPU test table"
printf '%s\n' "${results[@]}" | tee "$out/table.txt"
! grep -q FAIL "$out/table.txt"
