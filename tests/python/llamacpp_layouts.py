"""The llama.cpp recorder's layout conversions, without llama.cpp: nodes
laid out as ggml holds them ([ne3, ne2, ne1, ne0], the KV cache padded past
the positions seen) become moetrace's stages; a build whose node names are
unknown has each missing stage named with the node that was expected.
Run by tests/python_capture.rs (numpy only)."""

import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "python"))

from moetrace_capture.llamacpp import _missing, step_stages  # noqa: E402

config = {
    "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 4,
    "hidden_size": 8, "num_experts": 4, "num_experts_per_tok": 2, "vocab_size": 16, "norm_topk_prob": True,
    "model_type": "qwen3_moe",
}  # fmt: skip
rng = np.random.default_rng(0)
start, t_len, n_kv, heads, hd, k = 3, 2, 32, 2, 4, 2  # a decode-like step of 2 tokens at positions 3, 4
positions = start + t_len


def node(*ne):
    """Random values of a ggml tensor with ne = (ne0, ne1, ...), as numpy holds them."""
    return rng.standard_normal(tuple(reversed(ne))).astype(np.float32)


got = {
    ("attn_norm", 0, "MUL"): node(8, t_len, 1, 1),
    ("Qcur", 0, "MUL_MAT"): node(8, t_len, 1, 1),
    ("Kcur", 0, "MUL_MAT"): node(4, t_len, 1, 1),
    ("Vcur", 0, "MUL_MAT"): node(4, t_len, 1, 1),
    ("Qcur", 0, "RESHAPE"): node(4, 2, t_len, 1),  # a view: never a stage
    ("Qcur", 0, "ROPE"): node(hd, heads, t_len, 1),
    ("kq", 0, "MUL_MAT"): node(n_kv, t_len, heads, 1),
    ("kq_soft_max", 0, "SOFT_MAX"): node(n_kv, t_len, heads, 1),
    ("ffn_moe_topk", 0, "VIEW"): rng.integers(0, 4, size=(1, 1, t_len, k)).astype(np.int32),
    ("ffn_moe_down", 0, "MUL_MAT_ID"): node(8, k, t_len, 1),
    ("result_output", None, "MUL_MAT"): node(16, t_len, 1, 1),
}
stages = step_stages(got, config, start, t_len)

q = got[("Qcur", 0, "MUL_MAT")].reshape(t_len, 8)
kk = got[("Kcur", 0, "MUL_MAT")].reshape(t_len, 4)
v = got[("Vcur", 0, "MUL_MAT")].reshape(t_len, 4)
assert np.array_equal(stages[(0, "qkv_matmul")], np.concatenate([q, kk, v], axis=1))
rope = got[("Qcur", 0, "ROPE")]  # (1, t, heads, hd): the row of a token is its heads in order
assert np.array_equal(stages[(0, "q_post_rope")], rope.reshape(t_len, heads * hd))

scores = stages[(0, "attn_scores")]
assert scores.shape == (heads, t_len, positions), scores.shape
kq = got[("kq", 0, "MUL_MAT")].reshape(heads, t_len, n_kv)
scale = np.float32(1) / np.sqrt(np.float32(hd))
for h in range(heads):
    for t in range(t_len):
        for p in range(positions):
            want = 0.0 if p > start + t else kq[h, t, p] * scale  # masked entries 0, as moetrace writes them
            assert scores[h, t, p] == np.float32(want), (h, t, p)
assert stages[(0, "attn_softmax")].shape == (heads, t_len, positions)

ids = stages[(0, "moe_router_indices")]
assert ids.dtype == np.int32 and ids.shape == (t_len, k)
assert stages[(0, "moe_expert_out")].shape == (t_len, k, 8)
assert np.array_equal(stages[(0, "moe_expert_out")][1, 0], got[("ffn_moe_down", 0, "MUL_MAT_ID")][0, 1, 0])
assert stages[(None, "lm_head")].shape == (t_len, 16)
assert not any(stage == "attn_out" for _, stage in stages)  # no node for it given

# A build that renamed its nodes: each missing stage names the node it needs.
missing = _missing(config, stages, seen={"attn_norm", "ffn_moe_weights_normalised", "kq"})
assert "moe_router" in missing and "ffn_moe_weights_norm-L (DIV)" in missing["moe_router"], missing
assert "ffn_moe_weights_normalised" in missing["moe_router"], missing["moe_router"]
assert "qkv_matmul" not in missing and "attn_out" in missing
print("llama.cpp layouts: ok")
