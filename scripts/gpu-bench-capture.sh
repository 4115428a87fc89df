#!/usr/bin/env bash
# On the GPU machine (after scripts/gpu-build.sh here, .gpu carried): the
# full synthetic Qwen3-30B-A3B in Bf16, a 512-token prompt and 64 decode
# steps, with nothing captured (decode replayed from a CUDA graph), the same
# with graphs off (MOETRACE_NO_GRAPHS=1: every step eager), with graphs but
# no programmatic launches (nopdl: MOETRACE_NO_PDL=1), with every stage of layer 0 captured to disk,
# the same captured to /dev/shm (memory: what the capture path costs
# without the disk), and a bisect-style selection (moe_router_indices,
# moe_ffn_out, post_ffn_residual of all 48 layers at every step), through
# `moetrace run` as a user would. Prints the summaries
# (MOETRACE_PROFILE_STEPS=1 in the environment adds each step phase's host time;
# PRESET=qwen3-30b-a3b-q4km runs the quantized preset instead).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-.gpu/out}
mkdir -p "$out" /tmp/moetrace-bench
prompt=$(python3 -c 'print(", ".join(str((i * 7919 + 13) % 151936) for i in range(512)))')
for name in ${CASES:-off eager nopdl layer0 layer0-shm bisect}; do
    capture=""
    case $name in
        off | eager | nopdl) ;;
        layer0) capture='capture: (stages: "all", layers: "0", out_dir: "/tmp/moetrace-bench/captures"),' ;;
        layer0-nolm) capture='capture: (stages: "embedding,attn_norm,qkv_matmul,qk_norm,q_post_rope,k_post_rope,attn_scores,attn_softmax,attention,attn_out,post_attn_residual,ffn_norm,moe_router_logits,moe_router,moe_router_indices,moe_expert_gate,moe_expert_up,moe_expert_swigl,moe_expert_out,moe_ffn_out,post_ffn_residual,final_norm", layers: "0", out_dir: "/tmp/moetrace-bench/captures"),' ;;
        layer0-shm) capture='capture: (stages: "all", layers: "0", out_dir: "/dev/shm/moetrace-bench/captures"),' ;;
        bisect) capture='capture: (stages: "moe_router_indices,moe_ffn_out,post_ffn_residual", out_dir: "/tmp/moetrace-bench/captures"),' ;;
        bisect-shm) capture='capture: (stages: "moe_router_indices,moe_ffn_out,post_ffn_residual", out_dir: "/dev/shm/moetrace-bench/captures"),' ;;
    esac
    cat >/tmp/moetrace-bench/$name.ron <<RON
(
    model: Synthetic(preset: "${PRESET:-qwen3-30b-a3b}", seed: 7),
    prompt: Tokens([$prompt]),
    generate: 65,
    backend: Cuda(device: 0, dtype: Bf16),
    $capture
)
RON
    echo "== capture $name"
    unset MOETRACE_NO_GRAPHS MOETRACE_NO_PDL
    case $name in
        eager) export MOETRACE_NO_GRAPHS=1 ;;
        nopdl) export MOETRACE_NO_PDL=1 ;;
    esac
    .gpu/bin/moetrace run -q --config /tmp/moetrace-bench/$name.ron 2>&1 | tee "$out/bench-capture-$name.log"
done
rm -rf /tmp/moetrace-bench/captures /dev/shm/moetrace-bench
