#!/usr/bin/env bash
# The bugs engines shipped in a family, at real dimensions: `bisect
# --local` of Cpu against each `CpuWithBug(...)` target on the family's
# preset cut to LAYERS (4), a PROMPT_LEN-token prompt and 2 decode steps.
# CPU only (the weights are made on the host). Prints one line per bug:
# exit code, time, the findings (step, layer, stage) and the largest
# ratios; reports under $OUT.
#   FAMILY=deepseek (issue 24): deepseek-v3 (3 dense layers and one MoE
#     layer of 256 experts in 8 groups; FP8 projections with 128x128 block
#     scales), 16 prompt tokens; about 18 GB.
#     PRESET=deepseek-v3-negative-bias BUGS=MaskedGroupsAtZero: the
#     masked-groups bug where biased scores fall below 0 (on deepseek-v3
#     itself it is latent: its biases are all positive).
#   FAMILY=gpt-oss (issue 25): gpt-oss-20b (sliding and full layers, 32
#     MXFP4 experts), 136 prompt tokens (more than the window of 128).
#   bash scripts/bugs-real-scale.sh      (after cargo build --release -p cli)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-target/bugs-$FAMILY}
mkdir -p "$OUT"
m=${MOETRACE:-target/release/moetrace}
FAMILY=${FAMILY:-deepseek}
case "$FAMILY" in
    deepseek)
        PRESET=${PRESET:-deepseek-v3} VOCAB=129280 PROMPT_LEN=${PROMPT_LEN:-16}
        DEFAULT_BUGS='BiasInCombineWeights MaskedGroupsAtZero RoutedScalingDropped SharedExpertDropped Fp8NeighbourScale(1)' ;;
    gpt-oss)
        # A prompt longer than the 128-position window, so the sliding
        # layers see less than the full ones.
        PRESET=${PRESET:-gpt-oss-20b} VOCAB=201088 PROMPT_LEN=${PROMPT_LEN:-136}
        DEFAULT_BUGS='ClampDropped AlphaOne SinksDropped WindowOffByOne FullLayerWindowed(128) RouterBiasDropped Mxfp4ScaleOffByOne(1,0)' ;;
    *) echo "FAMILY is deepseek or gpt-oss, not $FAMILY" >&2; exit 2 ;;
esac
LAYERS=${LAYERS:-4}
prompt=$(python3 -c "print(', '.join(str((i * 7919 + 13) % $VOCAB) for i in range($PROMPT_LEN)))")
summary='import json, sys
r = json.load(open(sys.argv[1]))
places = sorted({(f["step"], f["layer"], f["stage"]) for f in r["findings"]})
sys_ = [(s["stage"], s["phase"], len(s["layers"])) for s in r["systematic_findings"]]
top = sorted(r["margins"], key=lambda m: -m["ratio"] if isinstance(m["ratio"], float) else 0)[:2]
flips = sum(len(x["flipped"]) for x in r["rows"])
print("{} finding(s) at {}; systematic {}; largest {}; {} flipped tokens".format(len(r["findings"]), places, sys_,
      ", ".join("{}/{} {:.1f}".format(m["stage"], m["phase"][0], m["ratio"]) for m in top), flips))'
for bug in ${BUGS:-$DEFAULT_BUGS}; do
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
