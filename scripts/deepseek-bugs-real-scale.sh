#!/usr/bin/env bash
# The bugs engines shipped in DeepSeek's MoE block and FP8 weights, at
# real dimensions (issue 24): `bisect --local` of Cpu against each
# `CpuWithBug(...)` target on the deepseek-v3 preset cut to LAYERS (4: the
# 3 dense layers and one MoE layer of 256 experts in 8 groups; projections
# FP8 with 128x128 block scales), a PROMPT_LEN-token prompt (16) and 2
# decode steps. CPU only (about 18 GB of memory: the FP8 weights are made
# on the host). Prints one line per bug: exit code, time, the findings
# (step, layer, stage) and the largest ratios; reports under $OUT.
#   bash scripts/deepseek-bugs-real-scale.sh      (after cargo build --release -p cli)
# PRESET=deepseek-v3-negative-bias BUGS=MaskedGroupsAtZero: the masked-groups
# bug where biased scores fall below 0 (on deepseek-v3 itself it is latent).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-target/deepseek-bugs}
mkdir -p "$OUT"
m=${MOETRACE:-target/release/moetrace}
LAYERS=${LAYERS:-4} PROMPT_LEN=${PROMPT_LEN:-16} PRESET=${PRESET:-deepseek-v3}
prompt=$(python3 -c "print(', '.join(str((i * 7919 + 13) % 129280) for i in range($PROMPT_LEN)))")
summary='import json, sys
r = json.load(open(sys.argv[1]))
places = sorted({(f["step"], f["layer"], f["stage"]) for f in r["findings"]})
sys_ = [(s["stage"], s["phase"], len(s["layers"])) for s in r["systematic_findings"]]
top = sorted(r["margins"], key=lambda m: -m["ratio"] if isinstance(m["ratio"], float) else 0)[:2]
flips = sum(len(x["flipped"]) for x in r["rows"])
print("{} finding(s) at {}; systematic {}; largest {}; {} flipped tokens".format(len(r["findings"]), places, sys_,
      ", ".join("{}/{} {:.1f}".format(m["stage"], m["phase"][0], m["ratio"]) for m in top), flips))'
for bug in ${BUGS:-BiasInCombineWeights MaskedGroupsAtZero RoutedScalingDropped SharedExpertDropped "Fp8NeighbourScale(1)"}; do
    name=$(tr -c 'A-Za-z0-9' '_' <<<"$bug")
    cat >"$OUT/$name.ron" <<RON
(model: Synthetic(preset: "$PRESET", seed: 7, layers: $LAYERS), prompt: Tokens([$prompt]), generate: 3,
 reference: Cpu, target: CpuWithBug($bug), mode: Local)
RON
    start=$(date +%s)
    $m bisect -q --config "$OUT/$name.ron" --json >"$OUT/$name.json" 2>"$OUT/$name.err"
    code=$?
    printf '%-24s exit %s %4ss  %s\n' "$bug" "$code" "$(($(date +%s) - start))" "$(python3 -c "$summary" "$OUT/$name.json" 2>&1 | cut -c1-400)"
done
