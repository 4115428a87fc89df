#!/usr/bin/env python3
"""Hugging Face transformers at the synthetic qwen3-30b-a3b preset's
dimensions (random bf16 weights on the GPU): prefill of a prompt and
greedy decode steps with the KV cache, timed like `moetrace run` times
them. Prints one line: `hf: prefill N tokens S s, T tokens/s; decode M
steps S s, T tokens/s`. Usage: hf_bench.py LAYERS PROMPT_LEN DECODE_STEPS.
"""
import sys
import time

import torch
from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

layers, prompt_len, steps = (int(a) for a in sys.argv[1:4])
config = Qwen3MoeConfig(
    vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768,
    num_hidden_layers=layers, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
    num_experts=128, num_experts_per_tok=8, norm_topk_prob=True, decoder_sparse_step=1,
    mlp_only_layers=[], max_position_embeddings=40960, rope_theta=1e6, rms_norm_eps=1e-6,
    tie_word_embeddings=False,
)
torch.manual_seed(0)
torch.set_default_dtype(torch.bfloat16)
with torch.device("cuda"):
    model = Qwen3MoeForCausalLM(config).eval()
prompt = torch.tensor([[(i * 7919 + 13) % 151936 for i in range(prompt_len)]], device="cuda")


def sync_time(f):
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = f()
    torch.cuda.synchronize()
    return result, time.perf_counter() - start


with torch.inference_mode():
    model(prompt[:, :16], use_cache=True)  # warm-up (kernels, allocator)
    prefills = []
    for _ in range(3):
        out, secs = sync_time(lambda: model(prompt, use_cache=True))
        prefills.append(secs)
    prefill = sorted(prefills)[1]
    past = out.past_key_values
    token = out.logits[:, -1:].argmax(-1)

    def decode():
        global past, token
        for _ in range(steps):
            o = model(token, past_key_values=past, use_cache=True)
            past, token = o.past_key_values, o.logits[:, -1:].argmax(-1)

    _, decode_secs = sync_time(decode)
print(f"hf: prefill {prompt_len} tokens {prefill:.3f} s, {prompt_len / prefill:.1f} tokens/s; "
      f"decode {steps} steps {decode_secs:.3f} s, {steps / decode_secs:.1f} tokens/s")
