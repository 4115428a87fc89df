"""Test vectors for moetrace's MLA attention (DeepSeek-V2/V3's multi-head
latent attention): transformers' `DeepseekV3Attention` in float64 on a tiny
random layer, a 5-token prompt then one decode step through its cache,
with every intermediate the attention's submodules produce, written to
tests/data/deepseek-v3-mla.json. Two cases: with q_lora_rank (q_a_proj ->
q_a_layernorm -> q_b_proj) and without (a plain q_proj); YaRN scaling with
mscale_all_dim (the softmax scale folds mscale in twice) and interleaved
rope, as DeepSeek-V3 ships.

Usage: make_mla_vectors.py OUT.json. Needs torch, transformers.
"""
import json
import sys

import torch
import transformers
from transformers.cache_utils import DynamicCache
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3Attention, DeepseekV3RotaryEmbedding

torch.manual_seed(0)
ROPE = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64, beta_fast=32,
            beta_slow=1, mscale=1.0, mscale_all_dim=1.0)


def case(name, q_lora_rank):
    config = transformers.DeepseekV3Config(
        hidden_size=64, num_attention_heads=4, num_key_value_heads=4, q_lora_rank=q_lora_rank, kv_lora_rank=16,
        qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=6, rope_parameters=dict(ROPE), rope_interleave=True,
        max_position_embeddings=256, rms_norm_eps=1e-6, attention_bias=False)
    config._attn_implementation = "eager"
    attn = DeepseekV3Attention(config, layer_idx=0).double().eval()
    with torch.no_grad():
        for p in attn.parameters():
            p.copy_(torch.randn_like(p) * (0.3 if p.dim() == 2 else 0.2) + (1.0 if p.dim() == 1 else 0.0))
    rotary = DeepseekV3RotaryEmbedding(config)
    recorded = {}

    def hook(name):
        def record(module, inputs, output):
            recorded.setdefault(name, []).append({"input": inputs[0].detach().double().reshape(-1, inputs[0].shape[-1]).tolist(),
                                                  "output": output.detach().double().reshape(-1, output.shape[-1]).tolist()})
        return record

    for sub in ["q_proj", "q_a_proj", "q_a_layernorm", "q_b_proj", "kv_a_proj_with_mqa", "kv_a_layernorm", "kv_b_proj",
                "o_proj"]:
        module = getattr(attn, sub)
        if module is not None:
            module.register_forward_hook(hook(sub))
    x = torch.randn(1, 6, 64, dtype=torch.float64)
    cache = DynamicCache(config=config)
    outputs = []
    for start, length in [(0, 5), (5, 1)]:
        positions = torch.arange(start, start + length).unsqueeze(0)
        cos, sin = rotary(x, positions)
        mask = None
        if length > 1:
            mask = torch.full((length, start + length), float("-inf"), dtype=torch.float64).triu(start + 1)[None, None]
        with torch.no_grad():
            out, _ = attn(x[:, start:start + length], (cos.double(), sin.double()), mask, cache=cache)
        outputs.append(out[0].tolist())
    weights = {n: {"shape": list(p.shape), "values": p.detach().reshape(-1).tolist()} for n, p in attn.named_parameters()}
    return {"name": name, "config": {k: getattr(config, k) for k in
                                     ["hidden_size", "num_attention_heads", "q_lora_rank", "kv_lora_rank",
                                      "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim", "rms_norm_eps",
                                      "rope_interleave"]},
            "rope_parameters": ROPE, "softmax_scale": attn.scaling, "hidden_states": x[0].tolist(),
            "steps": [[0, 5], [5, 1]], "weights": weights, "intermediates": recorded, "outputs": outputs}


cases = [case("q_lora", 24), case("plain q_proj", None)]
with open(sys.argv[1], "w", encoding="utf-8") as f:
    json.dump({"producer": f"transformers {transformers.__version__} DeepseekV3Attention, float64", "cases": cases}, f)
    f.write("\n")
print(f"{len(cases)} cases, softmax scale {cases[0]['softmax_scale']:.6f}")
