#!/usr/bin/env bash
# Issue 8's acceptance runs at real scale, on the GPU machine after
# scripts/gpu-build.sh (carry .gpu): qwen3-30b-a3b synthetic, all 48
# layers, reference Cpu (every core), target Cuda(Bf16), a 64-token prompt
# and 4 decode steps.
#   1. free-running bisect: where it stops (drift or a near-tie flip);
#   2. local bisect, clean: no outlier expected;
#   3. local bisect with two small faults (one expert at layer 30, one
#      token's attn_out at layer 41 step 2): both named, nothing else;
#   4. routing replay: Cuda(Bf16) replaying a CPU capture's routing, on the
#      tiny-qwen3-moe fixture and on the synthetic model (16-token prompt):
#      no routing flips, every stage within the bf16 tolerance.
# Reports (JSON, HTML) and logs go to $OUT; a table is printed last.
set -uo pipefail
cd "$(dirname "$0")/.."
final=${OUT:-.gpu/out}
mkdir -p "$final"
# Everything is written here; the device returns at most 8 files, so the
# logs travel back as one archive beside the two JSON reports and the table.
out=$(mktemp -d)
m=.gpu/bin/moetrace
work=$(mktemp -d)
prompt=$(python3 -c 'print(", ".join(str((i * 7919 + 13) % 151936) for i in range(64)))')
short=$(python3 -c 'print(", ".join(str((i * 7919 + 13) % 151936) for i in range(16)))')
model='Synthetic(preset: "qwen3-30b-a3b", seed: 7)'
cat >"$work/bisect.ron" <<RON
(model: $model, prompt: Tokens([$prompt]), generate: 5, reference: Cpu, target: Cuda(device: 0, dtype: Bf16))
RON
results=()
row() { results+=("$(printf '%-44s exit %-3s %6ss  %s' "$1" "$2" "$3" "$4")"); }
timed() { local s; s=$(date +%s%N); "$@"; code=$?; secs=$(awk -v a="$s" -v b="$(date +%s%N)" 'BEGIN { printf "%.1f", (b - a) / 1e9 }'); }

timed $m bisect -q --config "$work/bisect.ron" >"$out/free.txt" 2>&1
row "bisect free (48 layers, 64+4)" "$code" "$secs" "$(grep -m1 -E 'first divergence|no divergence' "$out/free.txt" | cut -c1-160)"
timed $m bisect -q --local --config "$work/bisect.ron" --json >"$out/local-clean.json" 2>"$out/local-clean.err"
row "bisect --local, clean" "$code" "$secs" "$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(len(r["findings"]), "findings;", sum(len(x["flipped"]) for x in r["rows"]), "flipped tokens")' "$out/local-clean.json")"
$m report "$out/local-clean.json" --html "$out/local-clean.html" >/dev/null 2>&1
timed $m bisect -q --local --config "$work/bisect.ron" --fault 'moe_expert_out@30#17=scale(1.05)' --fault 'attn_out@41.2:0=noise(0.02,5)' --json >"$out/local-faults.json" 2>"$out/local-faults.err"
row "bisect --local, 2 faults" "$code" "$secs" "$(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print([(f["step"], f["layer"], f["stage"], f["token"], f["expert"]) for f in r["findings"]])' "$out/local-faults.json")"
$m report "$out/local-faults.json" --html "$out/local-faults.html" >/dev/null 2>&1

# Routing replay, fixture and synthetic.
fixture_prompt=$(python3 -c 'import json; print(", ".join(map(str, json.load(open(".gpu/fixtures/tiny-qwen3-moe/activations/manifest.json"))["prompt"])))')
for case in "fixture|Path(\"$PWD/.gpu/fixtures/tiny-qwen3-moe/model\")|$fixture_prompt|8" "synthetic|$model|$short|5"; do
    IFS='|' read -r name mdl tokens gen <<<"$case"
    cat >"$work/$name-cpu.ron" <<RON
(model: $mdl, prompt: Tokens([$tokens]), generate: $gen, backend: Cpu, capture: (out_dir: "$work/$name-cpu"))
RON
    cat >"$work/$name-gpu.ron" <<RON
(model: $mdl, prompt: Tokens([$tokens]), generate: $gen, backend: Cuda(device: 0, dtype: Bf16), routing: Replay("$work/$name-cpu"), capture: (out_dir: "$work/$name-gpu"))
RON
    cat >"$work/$name-own.ron" <<RON
(model: $mdl, prompt: Tokens([$tokens]), generate: $gen, backend: Cuda(device: 0, dtype: Bf16), capture: (stages: "moe_router_indices,moe_router_logits", out_dir: "$work/$name-own"))
RON
    timed $m run -q --config "$work/$name-cpu.ron" >"$out/replay-$name.txt" 2>&1
    $m run -q --config "$work/$name-gpu.ron" >>"$out/replay-$name.txt" 2>&1
    $m run -q --config "$work/$name-own.ron" >>"$out/replay-$name.txt" 2>&1
    $m diff "$work/$name-cpu" "$work/$name-gpu" >"$out/replay-$name-diff.txt" 2>&1
    code=$?
    own=$($m diff "$work/$name-cpu" "$work/$name-own" 2>&1 | grep -c 'routing flip\|wrong router')
    over=$(python3 -c 'import json,sys; m=json.load(open(sys.argv[1])); print(sum(r["overridden_tokens"] for r in m["routing"]["replayed"]))' "$work/$name-gpu/manifest.json")
    row "replay $name: diff cpu vs gpu(replay)" "$code" "$secs" "$(grep -m1 -E '^compared' "$out/replay-$name-diff.txt"); $over tokens overridden; own routing: $own flip rows"
done
echo
echo "issue 8 table ($(nvidia-smi --query-gpu=name --format=csv,noheader | head -1), $(date -u +%F))"
printf '%s\n' "${results[@]}" | tee "$final/table-local.txt"
mv "$out/local-clean.json" "$out/local-faults.json" "$final/"
tar -czf "$final/logs-local.tar.gz" -C "$out" .
rm -rf "$work" "$out"
