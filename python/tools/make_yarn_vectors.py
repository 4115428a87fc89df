"""Test vectors for moetrace's YaRN RoPE scaling: transformers'
`_compute_yarn_parameters` (inverse frequencies and the cos/sin attention
factor) and `yarn_apply_mscale` (DeepSeek's softmax scale) for
DeepSeek-V3's and gpt-oss's published rope parameters and two variants,
written to tests/data/yarn.json.

Usage: make_yarn_vectors.py OUT.json. Needs torch, transformers.
"""
import json
import sys

import transformers
from transformers.modeling_rope_utils import _compute_yarn_parameters, yarn_apply_mscale

cases = []
for name, cls, theta, head_dim, params in [
    ("deepseek-v3", transformers.DeepseekV3Config, 10000.0, 64,
     dict(rope_type="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
          mscale=1.0, mscale_all_dim=1.0)),
    ("gpt-oss", transformers.GptOssConfig, 150000.0, 64,
     dict(rope_type="yarn", factor=32.0, original_max_position_embeddings=4096, beta_fast=32.0, beta_slow=1.0,
          truncate=False)),
    ("mscale only by factor, truncated", transformers.DeepseekV3Config, 1000000.0, 128,
     dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=32768, beta_fast=32, beta_slow=1)),
    ("explicit attention factor", transformers.DeepseekV3Config, 50000.0, 32,
     dict(rope_type="yarn", factor=8.0, original_max_position_embeddings=2048, attention_factor=1.25,
          mscale=0.707, mscale_all_dim=0.707)),
]:
    config = cls(rope_parameters=dict(rope_theta=theta, **params), max_position_embeddings=4096 * 32)
    if cls is transformers.DeepseekV3Config:
        config.qk_rope_head_dim = head_dim
    config.head_dim = head_dim
    inv_freq, attention_factor = _compute_yarn_parameters(config)
    qk_scale = 192 ** -0.5
    cases.append({"name": name, "theta": theta, "dim": head_dim, "rope_parameters": params,
                  "inv_freq": inv_freq.double().tolist(), "attention_factor": float(attention_factor),
                  "qk_scale": qk_scale, "softmax_scale": float(yarn_apply_mscale(config.rope_parameters, qk_scale))})
with open(sys.argv[1], "w", encoding="utf-8") as f:
    json.dump({"producer": f"transformers {transformers.__version__} _compute_yarn_parameters", "cases": cases},
              f, indent=1)
    f.write("\n")
print(f"{len(cases)} cases", [(c["name"], round(c["attention_factor"], 6), round(c["softmax_scale"], 6)) for c in cases])
