"""Test vectors for moetrace's DeepSeek-V3 router (grouped top-k of
sigmoid scores plus a correction bias that chooses but never weights):
transformers' own `DeepseekV3TopkRouter` run on chosen logits, written to
tests/data/deepseek-v3-router.json. The router's weight is the identity,
so its logits are the inputs (transformers computes them in float32).
Cases: groups masked with scores all negative after the bias (where
filling masked groups with 0 instead of -inf chooses wrongly), top-k
renormalised or not, a routed_scaling_factor, one group.

Usage: make_deepseek_router_vectors.py OUT.json. Needs torch, transformers.
"""
import json
import sys

import torch
import transformers
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter

torch.manual_seed(5)
cases = []
for name, experts, n_group, topk_group, top_k, norm, scale, bias_shift in [
    ("8 groups of 4 choose 2, top-4, renormalised, scaled 2.5", 32, 8, 2, 4, True, 2.5, 0.0),
    ("negative biased scores: masked groups must lose", 16, 4, 2, 3, True, 1.0, -2.0),
    ("not renormalised", 16, 4, 1, 2, False, 1.0, 0.1),
    ("one group", 8, 1, 1, 2, True, 1.5, 0.0),
]:
    config = transformers.DeepseekV3Config(
        hidden_size=experts, n_routed_experts=experts, num_experts_per_tok=top_k, n_group=n_group,
        topk_group=topk_group, norm_topk_prob=norm, routed_scaling_factor=scale)
    router = DeepseekV3TopkRouter(config)
    with torch.no_grad():
        router.weight.copy_(torch.eye(experts))
        router.e_score_correction_bias.copy_(torch.randn(experts) * 0.5 + bias_shift)
    logits = torch.randn(6, experts) * 2.0
    with torch.no_grad():
        out_logits, weights, ids = router(logits)
    tokens = []
    for t in range(logits.shape[0]):
        order = ids[t].tolist()
        tokens.append({"experts": order, "weights": weights[t].tolist()})
    cases.append({
        "name": name, "n_group": n_group, "topk_group": topk_group, "top_k": top_k, "norm_topk_prob": norm,
        "routed_scaling_factor": scale, "bias": router.e_score_correction_bias.tolist(),
        "logits": out_logits.tolist(), "tokens": tokens,
    })
with open(sys.argv[1], "w", encoding="utf-8") as f:
    json.dump({"producer": f"transformers {transformers.__version__} DeepseekV3TopkRouter, torch {torch.__version__}",
               "cases": cases}, f, indent=1)
    f.write("\n")
print(f"{len(cases)} cases")
