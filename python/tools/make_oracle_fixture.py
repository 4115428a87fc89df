"""moetrace's own oracle: a tiny random Qwen3-MoE, Qwen3, Mixtral or Qwen2-MoE checkpoint (bf16
safetensors in the Hugging Face layout) and Hugging Face transformers'
float64 forward of it, captured at every stage with moetrace_capture.hf
(prompt, then greedy decode steps). tests/fixtures/ holds two made by it,
so a fresh clone's oracle tests run; ../shared/fixtures, made by other
code, stays the independent cross-check. New architectures get their
oracle the same way.

Usage: make_oracle_fixture.py OUT_DIR NAME moe|dense|mixtral|qwen2moe|deepseek|gptoss SEED [key=value ...]
(keys: vocab hidden layers heads kv_heads head_dim experts topk moe_inter
inter shared_inter mlp_only prompt generate router_scale fp8, and for
deepseek q_lora kv_lora nope rope v_dim dense_first n_group topk_group
routed_scale bias). Needs torch, transformers, safetensors.

deepseek: DeepseekV3ForCausalLM with multi-head latent attention (q_lora=0:
a plain q_proj), YaRN rope scaling (factor 4, mscale_all_dim 1) and
interleaved rope; its first `dense_first` layers dense
(first_k_dense_replace), the others MoE: sigmoid scores, a correction bias
around `bias` (negative by default, so that every biased score is below 0
and masked groups must be -inf, not 0) choosing `topk_group` of `n_group`
groups, weights times `routed_scale`, one ungated shared expert
(mlp.shared_experts).

fp8=1 writes the attention and MLP projections as FP8 (e4m3) with one f32
`weight_scale_inv` per 128 x 128 block, as DeepSeek-V3 and Qwen3's -FP8
checkpoints lay them out (partial blocks where a dimension is not a
multiple of 128), and the oracle runs on them dequantised as DeepSeek's
reference `weight_dequant` does: w = f32(q) * scale[i // 128, j // 128] in
f32. transformers' own FP8 loading is not used for the oracle.

gptoss: GptOssForCausalLM with q/k/v/o biases, attention sinks, layers
alternating sliding-window (`window`) and full attention, YaRN as
gpt-oss's config has it (factor 32 over 4096, truncate false), a router
with a bias, experts with biases and interleaved gate/up rows, the clamped
SwiGLU (`limit`; the experts' weights `expert_scale` times wider than
1/sqrt(fan-in) so the clamp bites), every expert projection stored as
MXFP4 as the hub ships it (`*_blocks`, `*_scales`: e2m1 codes in pairs,
one e8m0 exponent per 32 values) and the oracle run on those values
dequantised as transformers' `convert_moe_packed_tensors` does
(FP4_VALUES[code] * 2^(scale - 127), exact).
"""
import json
import math
import os
import sys

import torch
import transformers
from safetensors.torch import save_file

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from moetrace_capture import hf  # noqa: E402

torch.set_grad_enabled(False)
out_root, name, kind, seed = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
D = dict(vocab=128, hidden=64, layers=2, heads=4, kv_heads=2, head_dim=16, experts=8, topk=2, moe_inter=32,
         inter=128, shared_inter=96, mlp_only="", prompt="1,17,42,99,5,77", generate=4, router_scale=3.0, fp8=0,
         q_lora=24, kv_lora=16, nope=8, rope=4, v_dim=6, dense_first=0, n_group=4, topk_group=2,
         routed_scale=2.5, bias=-1.0, window=4, limit=7.0, expert_scale=4.0)
for k, v in (a.split("=", 1) for a in sys.argv[5:]):
    D[k] = type(D[k])(v)
g = torch.Generator().manual_seed(seed)
H, V, L, nh, nkv, hd = D["hidden"], D["vocab"], D["layers"], D["heads"], D["kv_heads"], D["head_dim"]


def rn(*shape, std):
    return torch.randn(*shape, generator=g, dtype=torch.float64) * std


sd = {"model.embed_tokens.weight": rn(V, H, std=1.0), "model.norm.weight": 1 + rn(H, std=0.1),
      "lm_head.weight": rn(V, H, std=1 / math.sqrt(H))}
for i in range(L):
    p = f"model.layers.{i}."
    sd[p + "input_layernorm.weight"] = 1 + rn(H, std=0.1)
    sd[p + "post_attention_layernorm.weight"] = 1 + rn(H, std=0.1)
    if kind == "deepseek":  # multi-head latent attention
        a, rq, rkv, dqk = p + "self_attn.", D["q_lora"], D["kv_lora"], D["nope"] + D["rope"]
        if rq:
            sd[a + "q_a_proj.weight"] = rn(rq, H, std=1 / math.sqrt(H))
            sd[a + "q_a_layernorm.weight"] = 1 + rn(rq, std=0.1)
            sd[a + "q_b_proj.weight"] = rn(nh * dqk, rq, std=1 / math.sqrt(rq))
        else:
            sd[a + "q_proj.weight"] = rn(nh * dqk, H, std=1 / math.sqrt(H))
        sd[a + "kv_a_proj_with_mqa.weight"] = rn(rkv + D["rope"], H, std=1 / math.sqrt(H))
        sd[a + "kv_a_layernorm.weight"] = 1 + rn(rkv, std=0.1)
        sd[a + "kv_b_proj.weight"] = rn(nh * (D["nope"] + D["v_dim"]), rkv, std=1 / math.sqrt(rkv))
        sd[a + "o_proj.weight"] = rn(H, nh * D["v_dim"], std=1 / math.sqrt(nh * D["v_dim"]))
    else:
        sd[p + "self_attn.q_proj.weight"] = rn(nh * hd, H, std=1 / math.sqrt(H))
        sd[p + "self_attn.k_proj.weight"] = rn(nkv * hd, H, std=1 / math.sqrt(H))
        sd[p + "self_attn.v_proj.weight"] = rn(nkv * hd, H, std=1 / math.sqrt(H))
        sd[p + "self_attn.o_proj.weight"] = rn(H, nh * hd, std=1 / math.sqrt(nh * hd))
    if kind in ("qwen2moe", "gptoss"):  # q, k and v biases
        for x, width in (("q", nh * hd), ("k", nkv * hd), ("v", nkv * hd)):
            sd[p + f"self_attn.{x}_proj.bias"] = rn(width, std=0.5)
    if kind == "gptoss":  # o_proj's bias and the attention sinks
        sd[p + "self_attn.o_proj.bias"] = rn(H, std=0.1)
        sd[p + "self_attn.sinks"] = 0.5 + rn(nh, std=1.0)
    if kind in ("moe", "dense"):
        sd[p + "self_attn.q_norm.weight"] = 1 + rn(hd, std=0.1)
        sd[p + "self_attn.k_norm.weight"] = 1 + rn(hd, std=0.1)
    mlp_only = [int(x) for x in D["mlp_only"].split(",") if x]
    if kind == "deepseek" and i >= D["dense_first"]:
        E, I = D["experts"], D["moe_inter"]
        sd[p + "mlp.gate.weight"] = rn(E, H, std=D["router_scale"] / math.sqrt(H))
        sd[p + "mlp.gate.e_score_correction_bias"] = D["bias"] + rn(E, std=0.3)
        for e in range(E):
            sd[p + f"mlp.experts.{e}.gate_proj.weight"] = rn(I, H, std=1 / math.sqrt(H))
            sd[p + f"mlp.experts.{e}.up_proj.weight"] = rn(I, H, std=1 / math.sqrt(H))
            sd[p + f"mlp.experts.{e}.down_proj.weight"] = rn(H, I, std=1 / math.sqrt(I))
        sd[p + "mlp.shared_experts.gate_proj.weight"] = rn(I, H, std=1 / math.sqrt(H))
        sd[p + "mlp.shared_experts.up_proj.weight"] = rn(I, H, std=1 / math.sqrt(H))
        sd[p + "mlp.shared_experts.down_proj.weight"] = rn(H, I, std=1 / math.sqrt(I))
    elif kind == "gptoss":  # router with a bias; experts stacked, gate/up interleaved (rows of gate_up)
        E, I = D["experts"], D["inter"]
        sd[p + "mlp.router.weight"] = rn(E, H, std=D["router_scale"] / math.sqrt(H))
        sd[p + "mlp.router.bias"] = rn(E, std=0.5)
        sd[p + "mlp.experts.gate_up_proj"] = rn(E, 2 * I, H, std=D["expert_scale"] / math.sqrt(H))  # rows; transposed below
        sd[p + "mlp.experts.gate_up_proj_bias"] = rn(E, 2 * I, std=0.5)
        sd[p + "mlp.experts.down_proj"] = rn(E, H, I, std=1 / math.sqrt(I))
        sd[p + "mlp.experts.down_proj_bias"] = rn(E, H, std=0.1)
    elif kind in ("moe", "mixtral", "qwen2moe") and i not in mlp_only:
        # Mixtral as the hub ships it: block_sparse_moe, w1 gate, w3 up, w2 down.
        moe, gate, up, down = (("block_sparse_moe", "w1", "w3", "w2") if kind == "mixtral"
                               else ("mlp", "gate_proj", "up_proj", "down_proj"))
        E, I = D["experts"], D["moe_inter"]
        sd[p + f"{moe}.gate.weight"] = rn(E, H, std=D["router_scale"] / math.sqrt(H))
        for e in range(E):
            sd[p + f"{moe}.experts.{e}.{gate}.weight"] = rn(I, H, std=1 / math.sqrt(H))
            sd[p + f"{moe}.experts.{e}.{up}.weight"] = rn(I, H, std=1 / math.sqrt(H))
            sd[p + f"{moe}.experts.{e}.{down}.weight"] = rn(H, I, std=1 / math.sqrt(I))
        if kind == "qwen2moe":  # the shared expert and its sigmoid gate
            S = D["shared_inter"]
            sd[p + "mlp.shared_expert.gate_proj.weight"] = rn(S, H, std=1 / math.sqrt(H))
            sd[p + "mlp.shared_expert.up_proj.weight"] = rn(S, H, std=1 / math.sqrt(H))
            sd[p + "mlp.shared_expert.down_proj.weight"] = rn(H, S, std=1 / math.sqrt(S))
            sd[p + "mlp.shared_expert_gate.weight"] = rn(1, H, std=1 / math.sqrt(H))
    else:
        I = D["inter"]
        sd[p + "mlp.gate_proj.weight"] = rn(I, H, std=1 / math.sqrt(H))
        sd[p + "mlp.up_proj.weight"] = rn(I, H, std=1 / math.sqrt(H))
        sd[p + "mlp.down_proj.weight"] = rn(H, I, std=1 / math.sqrt(I))

BLOCK = 128


def fp8_blocks(w):
    """(e4m3 weight, f32 scale_inv per BLOCK x BLOCK block): each block's
    largest magnitude maps to e4m3's largest finite value, 448."""
    rows, cols = w.shape
    br, bc = -(-rows // BLOCK), -(-cols // BLOCK)
    scale = torch.zeros(br, bc, dtype=torch.float32)
    q = torch.zeros(rows, cols, dtype=torch.float8_e4m3fn)
    for i in range(br):
        for j in range(bc):
            block = w[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK].to(torch.float32)
            s = block.abs().max().clamp(min=1e-12) / 448.0
            scale[i, j] = s
            q[i * BLOCK:(i + 1) * BLOCK, j * BLOCK:(j + 1) * BLOCK] = (block / s).to(torch.float8_e4m3fn)
    return q, scale


def dequantised(q, scale):
    """DeepSeek's weight_dequant: f32(q) * scale[i // 128, j // 128], in f32."""
    rows, cols = q.shape
    s = scale.repeat_interleave(BLOCK, 0)[:rows].repeat_interleave(BLOCK, 1)[:, :cols]
    return q.to(torch.float32) * s


PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "gate_proj", "up_proj", "down_proj", ".w1.", ".w2.", ".w3.")
stored = {k: v.to(torch.bfloat16).contiguous() for k, v in sd.items()}
if D["fp8"]:
    for k in [k for k in sd if any(p in k for p in PROJECTIONS) and k.endswith(".weight")]:
        q, scale = fp8_blocks(stored[k])
        stored[k] = q.contiguous()
        stored[k + "_scale_inv"] = scale.contiguous()
        sd[k] = dequantised(q, scale).to(torch.float64)  # what the oracle computes with
    for k in [k for k in sd if k not in stored or stored[k].dtype == torch.bfloat16]:
        sd[k] = stored[k].to(torch.float64)
FP4_VALUES = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0],
                          dtype=torch.float64)


def mxfp4(w):
    """(blocks u8 [..., rows, cols/32, 16], scales u8 [..., rows, cols/32],
    the values they hold): each 32-value block's exponent the smallest
    that keeps its largest magnitude within 6 (e2m1's largest), each value
    the nearest e2m1 value (ties to the lower code), codes in pairs per
    byte (even value in the low nibble) as the hub's gpt-oss checkpoints
    lay them."""
    *pre, rows, cols = w.shape
    g = w.reshape(*pre, rows, cols // 32, 32)
    amax = g.abs().amax(-1).clamp(min=1e-30)
    e = torch.ceil(torch.log2(amax / 6.0)).clamp(-127, 127)
    scaled = g / torch.exp2(e)[..., None]
    magnitude = (scaled.abs()[..., None] - FP4_VALUES[:8]).abs().argmin(-1)
    code = magnitude + 8 * (scaled < 0).long()
    values = FP4_VALUES[code] * torch.exp2(e)[..., None]
    blocks = (code[..., 0::2] | (code[..., 1::2] << 4)).to(torch.uint8)
    return blocks.contiguous(), (e + 127).to(torch.uint8).contiguous(), values.reshape(w.shape)


if kind == "gptoss":
    # Stored as MXFP4 rows; the oracle's experts in transformers' layout
    # (gate_up_proj [E, H, 2I], down_proj [E, I, H]) hold the values.
    for k in [k for k in sd if k.endswith("mlp.experts.gate_up_proj") or k.endswith("mlp.experts.down_proj")]:
        blocks, scales, values = mxfp4(sd[k].to(torch.bfloat16).to(torch.float64))
        del stored[k]
        stored[k + "_blocks"], stored[k + "_scales"] = blocks, scales
        sd[k] = values.transpose(1, 2).contiguous()
    for k in [k for k in sd if k in stored and stored[k].dtype == torch.bfloat16]:
        sd[k] = stored[k].to(torch.float64)
model_dir = os.path.join(out_root, name, "model")
os.makedirs(model_dir, exist_ok=True)
save_file(stored, os.path.join(model_dir, "model.safetensors"), metadata={"format": "pt"})
common = dict(vocab_size=V, hidden_size=H, num_hidden_layers=L, num_attention_heads=nh, num_key_value_heads=nkv,
              head_dim=hd, rms_norm_eps=1e-6, rope_theta=1e6, max_position_embeddings=4096, tie_word_embeddings=False,
              attention_bias=False, torch_dtype="bfloat16", bos_token_id=1, eos_token_id=2)
if kind == "mixtral":
    # No head_dim key: Mixtral's is hidden / heads (the fixture's dims keep
    # them equal). The experts' width is intermediate_size.
    mixtral = {k: v for k, v in common.items() if k != "head_dim"}
    assert H // nh == hd, "Mixtral's head_dim is hidden_size / num_attention_heads"
    config = transformers.MixtralConfig(num_local_experts=D["experts"], num_experts_per_tok=D["topk"],
                                        intermediate_size=D["moe_inter"], **mixtral)
    cls = transformers.MixtralForCausalLM
elif kind == "qwen2moe":
    # q/k/v biases as `qkv_bias` (the class's key), top-k not renormalised.
    qwen2 = {k: v for k, v in common.items() if k != "attention_bias"}
    config = transformers.Qwen2MoeConfig(num_experts=D["experts"], num_experts_per_tok=D["topk"],
                                         moe_intermediate_size=D["moe_inter"], intermediate_size=D["inter"],
                                         shared_expert_intermediate_size=D["shared_inter"], norm_topk_prob=False,
                                         decoder_sparse_step=1, mlp_only_layers=mlp_only, qkv_bias=True, **qwen2)
    cls = transformers.Qwen2MoeForCausalLM
elif kind == "deepseek":
    deepseek = {k: v for k, v in common.items() if k not in ("head_dim", "num_key_value_heads", "rope_theta")}
    config = transformers.DeepseekV3Config(
        num_key_value_heads=nh, q_lora_rank=D["q_lora"] or None, kv_lora_rank=D["kv_lora"],
        qk_nope_head_dim=D["nope"], qk_rope_head_dim=D["rope"], v_head_dim=D["v_dim"], intermediate_size=D["inter"],
        moe_intermediate_size=D["moe_inter"], n_routed_experts=D["experts"], num_experts_per_tok=D["topk"],
        first_k_dense_replace=D["dense_first"], n_group=D["n_group"], topk_group=D["topk_group"],
        routed_scaling_factor=D["routed_scale"], n_shared_experts=1, norm_topk_prob=True, rope_interleave=True,
        rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64,
                             beta_fast=32, beta_slow=1, mscale=1.0, mscale_all_dim=1.0), **deepseek)
    cls = transformers.DeepseekV3ForCausalLM
elif kind == "gptoss":
    oss = {k: v for k, v in common.items() if k not in ("rope_theta", "attention_bias")}
    config = transformers.GptOssConfig(
        num_local_experts=D["experts"], num_experts_per_tok=D["topk"], intermediate_size=D["inter"],
        sliding_window=D["window"], swiglu_limit=D["limit"], attention_bias=True,
        layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(L)],
        rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0, beta_slow=1.0,
                             truncate=False, original_max_position_embeddings=4096), **oss)
    cls = transformers.GptOssForCausalLM
elif kind == "moe":
    config = transformers.Qwen3MoeConfig(num_experts=D["experts"], num_experts_per_tok=D["topk"],
                                         moe_intermediate_size=D["moe_inter"], intermediate_size=D["inter"],
                                         norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[], **common)
    cls = transformers.Qwen3MoeForCausalLM
else:
    config = transformers.Qwen3Config(intermediate_size=D["inter"], **common)
    cls = transformers.Qwen3ForCausalLM
config.architectures = [cls.__name__]  # as the hub's checkpoints say (converters read it)
config.save_pretrained(model_dir)


def from_checkpoint(folder):
    """The float64 model transformers reads from the checkpoint in `folder`."""
    kwargs = dict(dtype=torch.float64, attn_implementation="eager", output_loading_info=True)
    try:
        return cls.from_pretrained(folder, experts_implementation="eager", **kwargs)
    except TypeError:
        return cls.from_pretrained(folder, **kwargs)


def from_dequantised(quantization_config):
    """The float64 model on the dequantised weights (`sd`, exact in f32:
    read through an f32 copy of the checkpoint, so transformers' own FP8
    and MXFP4 code is not involved). The shipped config.json then says
    what the checkpoint is, as Qwen3's -FP8 and gpt-oss's checkpoints do."""
    import tempfile

    with tempfile.TemporaryDirectory() as plain:
        config.save_pretrained(plain)
        save_file({k: v.to(torch.float32).contiguous() for k, v in sd.items()},
                  os.path.join(plain, "model.safetensors"), metadata={"format": "pt"})
        loaded = from_checkpoint(plain)
    path = os.path.join(model_dir, "config.json")
    with open(path, encoding="utf-8") as f:
        shipped = json.load(f)
    shipped["quantization_config"] = quantization_config
    with open(path, "w", encoding="utf-8") as f:
        json.dump(shipped, f, indent=2)
    return loaded


if D["fp8"]:
    model, info = from_dequantised({"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                    "weight_block_size": [BLOCK, BLOCK]})
elif kind == "gptoss":
    model, info = from_dequantised({"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]})
else:
    model, info = from_checkpoint(model_dir)
# Every tensor of the checkpoint must have been read (a name transformers
# does not map would leave random weights in the oracle).
assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
model.eval()
prompt = [int(t) for t in D["prompt"].split(",")]
activations = os.path.join(out_root, name, "activations")
generated = hf.record(model, activations, prompt=prompt, generate=D["generate"], backend="hf-transformers",
                      source=f"moetrace python/tools/make_oracle_fixture.py {' '.join(sys.argv[2:])}")
manifest_path = os.path.join(activations, "manifest.json")
manifest = json.load(open(manifest_path, encoding="utf-8"))
manifest["producer"] = (f"moetrace_capture.hf with transformers {transformers.__version__} and torch "
                        f"{torch.__version__}: float64 forward of the bf16 checkpoint")
manifest["greedy_continuation"] = generated
with open(manifest_path, "w", encoding="utf-8") as f:
    json.dump(manifest, f, indent=1)
    f.write("\n")
print(f"{name}: {len(manifest['tensors'])} tensors, prompt {prompt}, greedy {generated}")
