#!/usr/bin/env bash
# On the GPU machine: moetrace, llama.cpp and Hugging Face transformers at
# the same dimensions, one after the other in one run (issue 26's table).
# Each row is a model; moetrace runs its synthetic preset (Bf16, 512 prompt
# tokens + 65, the second of two runs), llama.cpp runs llama-bench
# (-p 512 -n 64 -fa 1 -r 3) on a random-weight GGUF of the same
# dimensions and types written to /dev/shm, transformers runs
# scripts/hf_bench.py (bf16, qwen3moe rows only). Prints the table with
# moetrace's ratio to llama.cpp and writes it to $OUT/peers.md.
# Needs, built here:
#   GPU_PACK=1 GPU_LLAMACPP=1 GPU_LLAMACPP_LIBS=llamacpp-cuda-sm90-lib.txz bash scripts/gpu-build.sh
# (without GPU_LLAMACPP_LIBS the source travels and scripts/gpu-llamacpp-libs.sh builds it there)
# then, on one warm machine, the pack first (it leaves .gpu/bin there):
#   run(carry: [".gpu/pack.txz"], command: "tar xJf .gpu/pack.txz -C .gpu && ...")
#   run(carry: [".gpu/llamacpp"], command: "bash scripts/gpu-peers.sh")
# (or a pack of only bin/moetrace beside .gpu/llamacpp in one call: 64 MiB hold both).
# ROWS picks rows by name (default: all): bf16-48 bf16-24 q4km-48 gpt-oss-20b.
# HF=0 leaves transformers out.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/moetrace-out}
mkdir -p "$OUT"
L=$PWD/.gpu/llamacpp
m=$PWD/.gpu/bin/moetrace
work=/tmp/moetrace-peers
rm -rf "$work" && mkdir -p "$work"
[ -x "$m" ] || { echo "no $m: unpack .gpu/pack.txz first" >&2; exit 2; }
# Without a carried archive, llama.cpp's libraries are built here first (250 s).
[ -f "$L/lib.txz" ] || OUT="$OUT" bash scripts/gpu-llamacpp-libs.sh || exit 2
tar xJf "$L/lib.txz" -C "$work"
# llama-bench's main is one call into the libraries' libllama-bench-impl.so.
printf 'int llama_bench(int argc, char ** argv);\nint main(int argc, char ** argv) { return llama_bench(argc, argv); }\n' >"$work/main.cpp"
g++ -O2 "$work/main.cpp" -o "$work/llama-bench" -L"$work/lib" -lllama-bench-impl -Wl,-rpath,"$work/lib" || exit 2
export PYTHONPATH="$L/py" MOETRACE_SHARED_TOOLS="$L/tools"
card=$(nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | head -1)
rows=(
    # name|moetrace preset|layers|vocab|GGUF maker and arguments|hf layers
    "bf16-48|qwen3-30b-a3b|48|151936|$L/tools/llamacpp/make_gguf.py --type bf16 --layers 48|48"
    "bf16-24|qwen3-30b-a3b|24|151936|$L/tools/llamacpp/make_gguf.py --type bf16 --layers 24|24"
    "q4km-48|qwen3-30b-a3b-q4km|48|151936|$L/tools/llamacpp/make_gguf.py --type q4_k_m --layers 48|"
    "gpt-oss-20b|gpt-oss-20b|24|201088|python/tools/make_gpt_oss_gguf.py|"
)
table=()
rate() { grep -o "$1 [0-9.]* s, [0-9.]* tokens/s" <<<"$2" | grep -o '[0-9.]* tokens/s' | cut -d' ' -f1; }
# moetrace's rate over a peer's ("383.1 +- 16.2": its mean), or - where either is missing.
ratio() { python3 -c "import sys; a, b = sys.argv[1], sys.argv[2].split()[0] if sys.argv[2] else ''; print('%.2fx' % (float(a) / float(b)) if a and b not in ('', '-') else '-')" "$1" "$2"; }
for row in "${rows[@]}"; do
    IFS='|' read -r name preset layers vocab maker hf_layers <<<"$row"
    if [ -n "${ROWS:-}" ] && [[ " $ROWS " != *" $name "* ]]; then continue; fi
    prompt=$(python3 -c "print(', '.join(str((i * 7919 + 13) % $vocab) for i in range(512)))")
    cat >"$work/$name.ron" <<RON
(model: Synthetic(preset: "$preset", seed: 7, layers: $layers), prompt: Tokens([$prompt]), generate: 65, backend: Cuda(device: 0, dtype: Bf16))
RON
    "$m" run -q --config "$work/$name.ron" >/dev/null 2>&1 # warm-up
    mt=$("$m" run -q --config "$work/$name.ron" 2>&1 | grep '^run:')
    echo "$name moetrace: $mt"
    gguf=/dev/shm/peers-$name.gguf
    # shellcheck disable=SC2086
    python3 $maker "$gguf" | tail -1
    bench=$(LD_LIBRARY_PATH="$work/lib" "$work/llama-bench" -m "$gguf" -ngl 99 -p 512 -n 64 -fa 1 -r 3 -o csv 2>/dev/null)
    rm -f "$gguf"
    lc_pp=$(python3 -c 'import csv,sys,io; r=[x for x in csv.DictReader(io.StringIO(sys.argv[1])) if int(x["n_prompt"])>0]; print("%.0f +- %.0f" % (float(r[0]["avg_ts"]), float(r[0]["stddev_ts"])) if r else "-")' "$bench")
    lc_tg=$(python3 -c 'import csv,sys,io; r=[x for x in csv.DictReader(io.StringIO(sys.argv[1])) if int(x["n_gen"])>0]; print("%.1f +- %.1f" % (float(r[0]["avg_ts"]), float(r[0]["stddev_ts"])) if r else "-")' "$bench")
    echo "$name llama.cpp: pp512 $lc_pp, tg64 $lc_tg"
    hf="-"
    if [ -n "$hf_layers" ] && [ "${HF:-1}" != 0 ]; then
        hf=$(PYTHONUNBUFFERED=1 python3 scripts/hf_bench.py "$hf_layers" 512 64 2>&1 | tail -1)
        echo "$name transformers: $hf"
    fi
    m_pp=$(rate "prefill" "$mt" | head -1) m_tg=$(rate "steps" "$mt" | head -1)
    h_pp=$(rate "tokens" "$hf" | head -1) h_tg=$(rate "steps" "$hf" | head -1)
    table+=("| $name | ${m_tg:--} | $lc_tg | $(ratio "$m_tg" "$lc_tg") | ${h_tg:--} | ${m_pp:--} | $lc_pp | $(ratio "$m_pp" "$lc_pp") | ${h_pp:--} |")
done
{
    echo "$card, $(date -u +%F); moetrace Bf16 512 + 65 tokens (second run), llama-bench -p 512 -n 64 -fa 1 -r 3, transformers bf16 512 + 64"
    echo
    echo "| model | moetrace decode tokens/s | llama.cpp tg64 | ratio | transformers decode | moetrace prefill 512 tokens/s | llama.cpp pp512 | ratio | transformers prefill |"
    echo "|---|---|---|---|---|---|---|---|---|"
    printf '%s\n' "${table[@]}"
} | tee "$OUT/peers.md"
