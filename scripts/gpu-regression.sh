#!/usr/bin/env bash
# The real-scale local-mode regression suite (issue 20): every change to GPU
# numerics (a kernel, a fused path, a rounding point) runs it on the GPU
# machine before it lands, and its table goes into the record. After
# scripts/gpu-build.sh (carry .gpu):
#   run(command: "CASES='...' bash scripts/gpu-regression.sh", carry: [".gpu"])
#
# Each case is `bisect --local` of Cpu against Cuda(Bf16) on a synthetic
# preset at real dimensions, judged by the expected-error model (the CPU
# keeping the Bf16 contract beside the target):
#   clean cases must give exit 0 and 0 findings (the table shows the
#     largest ratio to the expected error: the margin to the threshold);
#   fault cases must give exactly their faults, each found alone at its
#     step, layer, token and expert: 2% on one expert slot at a decode step,
#     2% on one prompt token's attention output, 1% on one decode step's
#     whole ffn_norm.
# REFERENCE names bisect's reference (default Cpu; `Cuda(device: 0, dtype:
# F64)` is the CPU reference with its products on the device: the same
# verdicts, the time to them is what changes).
# CASES picks cases by name (default: all); a case is
#   name|preset|layers|seed|prompt tokens|generate|faults[|vocab]
# (vocab: the prompt's ids are taken modulo it, 151936 by default).
# (faults: `;`-separated CLI specs, `EXPERT` replaced by an expert routed
# at that place in a quick run of the target).
# Reports (JSON) and logs travel back as one archive; the table is printed
# last and written to $OUT/table-regression.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
final=${OUT:-.gpu/out}
mkdir -p "$final"
out=$(mktemp -d)
work=$(mktemp -d)
m=.gpu/bin/moetrace
all_cases=(
    "bf16-64-clean|qwen3-30b-a3b|48|7|64|5|"
    "bf16-64-faults|qwen3-30b-a3b|48|7|64|5|moe_expert_out@37.2#EXPERT=scale(1.02);attn_out@20.0:17=scale(1.02);ffn_norm@9.3=scale(1.01)"
    "bf16-16-clean|qwen3-30b-a3b|48|11|16|5|"
    "bf16-512-clean|qwen3-30b-a3b|12|23|512|3|"
    "q4km-64-clean|qwen3-30b-a3b-q4km|48|7|64|5|"
    "q4km-64-faults|qwen3-30b-a3b-q4km|48|7|64|5|moe_expert_out@37.2#EXPERT=scale(1.02);attn_out@20.0:17=scale(1.02);ffn_norm@9.3=scale(1.01)"
    "q4km-16-clean|qwen3-30b-a3b-q4km|12|11|16|5|"
    "moonlight-64-clean|moonlight-16b-a3b|27|7|64|5||163840"
    "moonlight-64-faults|moonlight-16b-a3b|27|7|64|5|moe_expert_out@20.2#EXPERT=scale(1.02);attention@10.0:17=scale(1.02);mla_kv_a_norm@5.3=scale(1.01)|163840"
    "dsv3-16-clean|deepseek-v3|4|11|16|3||129280"
    "dsv3-16-faults|deepseek-v3|4|11|16|3|moe_router@3.1=scale(1.02);mla_q@1.0:9=scale(1.02)|129280"
    "gptoss-160-clean|gpt-oss-20b|24|7|160|5||201088"
    "gptoss-160-faults|gpt-oss-20b|24|7|160|5|moe_expert_out@13.2#EXPERT=scale(1.02);attention@20.0:140=scale(1.02);ffn_norm@9.3=scale(1.01)|201088"
)
wanted=${CASES:-all}
results=()
timed() { local s; s=$(date +%s%N); "$@"; code=$?; secs=$(awk -v a="$s" -v b="$(date +%s%N)" 'BEGIN { printf "%.0f", (b - a) / 1e9 }'); }
summary='import json, sys
r = json.load(open(sys.argv[1]))
lone = [(f["step"], f["layer"], f["stage"], f["token"], f["expert"], round(f["expected"]["ratio"], 1) if f.get("expected") else None) for f in r["findings"]]
sys_ = [(s["stage"], s["phase"], len(s["layers"])) for s in r["systematic_findings"]]
top = sorted(r["margins"], key=lambda m: -m["ratio"] if isinstance(m["ratio"], float) else 0)[:3]
flips = sum(len(x["flipped"]) for x in r["rows"])
ratios = ", ".join("{}/{} {:.2f}".format(m["stage"], m["phase"][0], m["ratio"]) for m in top)
print("{} lone {}; {} systematic {}; largest ratios {}; {} flipped tokens".format(len(lone), lone, len(sys_), sys_, ratios, flips))'
for case in "${all_cases[@]}"; do
    IFS='|' read -r name preset layers seed n gen faults vocab <<<"$case"
    if [ "$wanted" != all ] && [[ " $wanted " != *" $name "* ]]; then continue; fi
    prompt=$(python3 -c "print(', '.join(str((i * 7919 + 13 * $seed) % ${vocab:-151936}) for i in range($n)))")
    model="Synthetic(preset: \"$preset\", seed: $seed, layers: $layers)"
    cat >"$work/$name.ron" <<RON
(model: $model, prompt: Tokens([$prompt]), generate: $gen, reference: ${REFERENCE:-Cpu}, target: Cuda(device: 0, dtype: Bf16))
RON
    args=()
    if [ -n "$faults" ]; then
        if [[ "$faults" == *EXPERT* ]]; then
            # An expert routed at the expert fault's (layer, step): slot 0 of
            # token 0 in a run of the reference, whose greedy tokens bisect
            # feeds both sides (a run of the target may pick other tokens:
            # gpt-oss-20b's did on 2026-12-08, and the fault met no slot).
            spec=$(tr ';' '\n' <<<"$faults" | grep EXPERT)
            layer=$(sed -E 's/^[a-z_]+@([0-9]+)\.([0-9]+).*/\1/' <<<"$spec")
            step=$(sed -E 's/^[a-z_]+@([0-9]+)\.([0-9]+).*/\2/' <<<"$spec")
            cat >"$work/$name-ids.ron" <<RON
(model: $model, prompt: Tokens([$prompt]), generate: $((step + 1)), backend: ${REFERENCE:-Cpu}, capture: (stages: "moe_router_indices", layers: "$layer", steps: "$step", out_dir: "$work/$name-ids"))
RON
            $m run -q --config "$work/$name-ids.ron" >"$out/$name-ids.txt" 2>&1
            expert=$(python3 -c "import numpy, glob; print(int(numpy.load(glob.glob('$work/$name-ids/**/*.npy', recursive=True)[0])[0, 0]))")
            faults=${faults//EXPERT/$expert}
        fi
        IFS=';' read -ra specs <<<"$faults"
        for f in "${specs[@]}"; do args+=(--fault "$f"); done
    fi
    timed $m bisect -q --local --config "$work/$name.ron" "${args[@]}" --json >"$out/$name.json" 2>"$out/$name.err"
    line=$(python3 -c "$summary" "$out/$name.json" 2>&1 | cut -c1-600)
    results+=("$(printf '%-16s %-20s L%-3s seed %-3s %4s+%-2s exit %s %5ss  %s' "$name" "$preset" "$layers" "$seed" "$n" "$gen" "$code" "$secs" "$line")")
    # A fault that changed nothing (moetrace warns) is named in the table:
    # a case that finds fewer faults than it asked for must say why.
    noop=$(grep -o 'fault [^:]*: no slot[^;]*' "$out/$name.err" | tr '\n' ';')
    [ -n "$faults" ] && results+=("                 faults: $faults${noop:+ (NOT APPLIED: $noop)}")
    # Each case as it ends: a run cut short by the time limit keeps these.
    if [ -n "$faults" ]; then printf '%s\n' "${results[-2]}" "${results[-1]}"; else echo "${results[-1]}"; fi
    gzip -c "$out/$name.json" >"$final/$name.json.gz"
done
echo
echo "regression table ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(date -u +%F), reference ${REFERENCE:-Cpu}, threshold: findings above 2x expected)"
printf '%s\n' "${results[@]}" | tee "$final/table-regression.txt"
tar -czf "$final/regression-reports.tar.gz" -C "$out" .
rm -rf "$work" "$out"
