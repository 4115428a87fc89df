#!/usr/bin/env bash
# On the GPU machine (after scripts/gpu-build.sh here, .gpu carried): where
# the time of the full synthetic Qwen3-30B-A3B in Bf16 goes.
#   1. cold start: the same run twice on this machine (the first one pays
#      whatever is loaded or compiled once per machine);
#   2. GPU time per stage (MOETRACE_PROFILE_OPS: CUDA events around each
#      backend operation) of the full model, prefill and decode apart;
#   3. ncu of a small run (2 layers, 8-token prompt, 3 decode steps): each
#      kernel's duration and DRAM traffic, summed per step and per kernel
#      (scripts/profile_table.py), bandwidth against the 3.0 TB/s copy rate.
# Writes $OUT/profile-ncu.csv and $OUT/profile.log.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-.gpu/out}
mkdir -p "$out" /tmp/moetrace-profile
tmp=/tmp/moetrace-profile
tokens() { python3 -c "import sys; n=int(sys.argv[1]); print(', '.join(str((i * 7919 + 13) % 151936) for i in range(n)))" "$1"; }
config() { # name prompt_len generate
    cat >"$tmp/$1.ron" <<RON
(model: Synthetic(preset: "qwen3-30b-a3b", seed: 7), prompt: Tokens([$(tokens "$2")]), generate: $3, backend: Cuda(device: 0, dtype: Bf16))
RON
}
config bench 512 65
{
    for run in ${RUNS:-cold warm}; do
        echo "== $run: prompt 512, 64 decode steps"
        .gpu/bin/moetrace run --config "$tmp/bench.ron" 2>&1 | grep -E "ready|prefill|decode|run:|compiled|loaded" | tail -6
    done
    # GPU time per stage from CUDA events inside the run (clocks and caches
    # as in a normal run, unlike ncu), and the GPU's idle share per step.
    echo "== GPU time per stage, 48 layers, prompt 512 + 64 decode steps"
    MOETRACE_PROFILE_OPS=1 .gpu/bin/moetrace run -q --config "$tmp/bench.ron" 2>&1 | tee "$out/profile-ops.txt" | grep -v "^run:\|^capture:"
    # ncu (Nsight Compute): every kernel of a 2-layer model's run, 8-token
    # prompt then 3 decode steps, with its duration and DRAM bytes; the
    # per-step table is printed by scripts/profile_table.py.
    ncu=$(command -v ncu || ls /usr/local/cuda/bin/ncu 2>/dev/null)
    if [ -n "$ncu" ]; then
        cat >"$tmp/ncu.ron" <<RON
(model: Synthetic(preset: "qwen3-30b-a3b", seed: 7, layers: ${PROFILE_LAYERS:-2}), prompt: Tokens([$(tokens "${PROFILE_PROMPT:-8}")]), generate: 3, backend: Cuda(device: 0, dtype: Bf16))
RON
        # NCU_ARGS: e.g. "--cache-control none --clock-control none" for a
        # decode step's small kernels at the clocks and caches of a run.
        # shellcheck disable=SC2086
        "$ncu" ${NCU_ARGS:-} --csv --page raw --metrics gpu__time_duration.sum,dram__bytes_read.sum,dram__bytes_write.sum \
            .gpu/bin/moetrace run -q --config "$tmp/ncu.ron" >"$out/profile-ncu.csv" 2>"$out/profile-ncu.err"
        echo "ncu exit $?: $(grep -c '^"[0-9]' "$out/profile-ncu.csv") kernels"
        python3 scripts/profile_table.py "$out/profile-ncu.csv"
    else
        echo "ncu not found"
    fi
} 2>&1 | tee "$out/profile.log"
