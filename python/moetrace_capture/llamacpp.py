"""Every moetrace stage llama.cpp names, captured while it generates: a GGUF
run through llama.cpp (via llama-cpp-python, CPU or CUDA offload) with an
eval callback (`cb_eval`) that reads each named graph node through ggml's
own API, converts llama.cpp's layouts to moetrace's shapes and writes a
moetrace capture.

    python -m moetrace_capture.llamacpp MODEL.gguf OUT --prompt 1,17,423 --generate 8
    python -m moetrace_capture.llamacpp MODEL.gguf OUT --text "Hello" --gpu-layers 99

Then `moetrace check OUT --model MODEL.gguf` gives each stage's own error
of llama.cpp, and `moetrace diff OUT <moetrace capture>` compares runs.
Qwen3-MoE, Qwen3, Qwen2-MoE and Mixtral (`llama` with experts) GGUFs. Needs llama-cpp-python 0.3.x and
gguf (llama.cpp's GGUF reader).

Attention is recorded without flash attention (llama.cpp's fused
flash-attention op holds neither the scores nor the probabilities); the
KV cache keeps llama.cpp's default f16 unless `--kv-type f32`. Stages
llama.cpp computes inside a fused operation (the SiLU before the multiply
of a fused SwiGLU) are not recorded, and the recorder says so.
"""

import argparse
import ctypes
import os
import sys

import numpy as np

from .ggml_tensors import Ggml
from .writer import Capture

# Per architecture: the Hugging Face class and model_type moetrace reads
# for it (pipeline's gguf_model.rs reads the same metadata the same way).
ARCHITECTURES = {
    "qwen3moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "qwen2moe": ("Qwen2MoeForCausalLM", "qwen2_moe"),
    "llama": ("MixtralForCausalLM", "mixtral"),
    "gpt-oss": ("GptOssForCausalLM", "gpt_oss"),
}

# llama.cpp node names (without the `-<layer>` suffix) read per layer, and
# those of the whole model.
LAYER_NODES = (
    "attn_norm", "Qcur", "Kcur", "Vcur", "Qcur_normed", "Kcur_normed", "kq", "kq_soft_max", "kqv_out",
    "ffn_inp", "ffn_norm", "ffn_moe_logits", "ffn_moe_topk", "ffn_moe_weights", "ffn_moe_weights_norm",
    "ffn_moe_gate", "ffn_moe_up", "ffn_moe_swiglu", "ffn_moe_down", "ffn_moe_out",
    "ffn_gate", "ffn_up", "ffn_swiglu", "ffn_out", "l_out", "ffn_shexp_gate_inp", "ffn_shexp_gate", "ffn_shexp",
)  # fmt: skip
# gpt-oss's besides (asked for in its graphs only): the biased o_proj, the
# post-attention norm, the router's and experts' biases, the softmax over
# the chosen logits, the fused SwiGLU.
GPT_OSS_NODES = (
    "attn_out", "attn_post_norm", "ffn_moe_probs", "ffn_moe_weights_softmax", "ffn_moe_gate_biased",
    "ffn_moe_up_biased", "ffn_moe_swiglu_oai", "ffn_moe_down_biased",
)  # fmt: skip


def _layer_nodes(config):
    """The per-layer nodes read for this model."""
    return LAYER_NODES + (GPT_OSS_NODES if config["model_type"] == "gpt_oss" else ())
MODEL_NODES = ("embd", "result_norm", "result_output")
# Nodes read although they are reshapes (llama.cpp names the reshape, not
# the operation before it): gpt-oss's routing weights after their softmax.
RESHAPED_NODES = ("ffn_moe_weights_softmax",)

# What no node of llama.cpp's graph holds, and why.
NOT_RECORDED = {
    "ffn_silu": "llama.cpp computes SiLU and the multiply in one fused op (ffn_swiglu)",
    "attn_sink": "llama.cpp adds the sink inside its softmax (ggml_soft_max_add_sinks): no node holds the sink's share",
    "moe_expert_clamp": "llama.cpp clamps inside its fused SwiGLU (ffn_moe_swiglu_oai): no node holds the clamped gate and up",
}

# The llama.cpp node (name-<layer>, operation) each stage is read from.
NODE_OF = {
    "embedding": "embd", "attn_norm": "attn_norm-L (MUL)",
    "qkv_matmul": "Qcur-L, Kcur-L, Vcur-L (MUL_MAT)", "qk_norm": "Qcur_normed-L, Kcur_normed-L (MUL)",
    "q_post_rope": "Qcur-L (ROPE)", "k_post_rope": "Kcur-L (ROPE)", "attn_scores": "kq-L (MUL_MAT)",
    "attn_softmax": "kq_soft_max-L (SOFT_MAX)", "attention": "kqv_out-L (CONT)",
    "attn_out": "the MUL_MAT reading kqv_out-L", "post_attn_residual": "ffn_inp-L (ADD)",
    "ffn_norm": "ffn_norm-L (MUL)", "moe_router_logits": "ffn_moe_logits-L (MUL_MAT)",
    "moe_router": "ffn_moe_weights_norm-L (DIV)", "moe_router_indices": "ffn_moe_topk-L",
    "moe_expert_gate": "ffn_moe_gate-L (MUL_MAT_ID)", "moe_expert_up": "ffn_moe_up-L (MUL_MAT_ID)",
    "moe_expert_swigl": "ffn_moe_swiglu-L (GLU)", "moe_expert_out": "ffn_moe_down-L (MUL_MAT_ID)",
    "moe_ffn_out": "ffn_moe_out-L", "ffn_gate": "ffn_gate-L (MUL_MAT)", "ffn_up": "ffn_up-L (MUL_MAT)",
    "ffn_swigl": "ffn_swiglu-L (GLU)", "ffn_out": "ffn_out-L (MUL_MAT)", "post_ffn_residual": "l_out-L (ADD)",
    "final_norm": "result_norm (MUL)", "lm_head": "result_output (MUL_MAT)",
    "qkv_bias": "Qcur-L, Kcur-L, Vcur-L (ADD)", "moe_shared_gate": "ffn_gate-L (MUL_MAT)",
    "moe_shared_up": "ffn_up-L (MUL_MAT)", "moe_shared_swigl": "ffn_swiglu-L (GLU)",
    "moe_shared_out": "ffn_shexp-L (MUL_MAT)", "moe_shared_logit": "ffn_shexp_gate_inp-L (MUL_MAT)",
    "moe_shared_weight": "ffn_shexp_gate-L (DIV: llama.cpp's sigmoid is silu(x) / x)",
}  # fmt: skip
# gpt-oss reads these stages from other nodes (step_stages).
NODE_OF_GPT_OSS = {
    "attn_out": "attn_out-L (ADD: o_proj and its bias)", "ffn_norm": "attn_post_norm-L (MUL)",
    "moe_router_logits": "ffn_moe_probs-L (ADD: the logits and the router's bias)",
    "moe_router": "ffn_moe_weights_softmax-L (RESHAPE of the SOFT_MAX)",
    "moe_expert_gate": "ffn_moe_gate_biased-L (ADD_ID)", "moe_expert_up": "ffn_moe_up_biased-L (ADD_ID)",
    "moe_expert_swigl": "ffn_moe_swiglu_oai-L (GLU)", "moe_expert_out": "ffn_moe_down_biased-L (ADD_ID)",
    "attn_window": "kq_soft_max-L (SOFT_MAX: the first and last position given any weight)",
}  # fmt: skip


class RecorderError(RuntimeError):
    """A recording that cannot be made; the message names the bad input."""


def gguf_config(path):
    """The model's config.json as moetrace reads a GGUF's metadata: the
    mapping of pipeline's gguf_model.rs (`config_json`), here so that
    recording needs no moetrace binary. check compares the two (a capture
    of "another model" is refused), so tests/llama_cpp_capture.rs holds them
    equal for every architecture recorded."""
    try:
        import gguf
    except ImportError as e:
        raise RecorderError("reading the GGUF's metadata needs llama.cpp's reader: pip install gguf") from e
    reader = gguf.GGUFReader(path)

    def value(key):
        field = reader.fields.get(key)
        if field is None:
            return None
        v = field.contents()
        return v.decode() if isinstance(v, bytes) else v

    arch = value("general.architecture")
    if arch not in ARCHITECTURES:
        raise RecorderError(f"{path}: architecture `{arch}` is not recorded here (valid: {', '.join(ARCHITECTURES)})")
    cls, model_type = ARCHITECTURES[arch]

    def need(key):
        v = value(f"{arch}.{key}")
        if v is None:
            raise RecorderError(f"{path}: missing metadata key `{arch}.{key}`")
        return v

    tensors = {t.name: t for t in reader.tensors}
    if "token_embd.weight" not in tensors:
        raise RecorderError(f"{path}: no tensor `token_embd.weight`")
    config = {
        "architectures": [cls],
        "model_type": model_type,
        "vocab_size": int(tensors["token_embd.weight"].shape[1]),
        "hidden_size": int(need("embedding_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": int(need("attention.head_count")),
        "num_key_value_heads": int(need("attention.head_count_kv")),
        "head_dim": int(value(f"{arch}.attention.key_length") or need("embedding_length") // need("attention.head_count")),
        "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(need("rope.freq_base")),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": False,
        "torch_dtype": "float32",
    }
    for key, name in (("context_length", "max_position_embeddings"), ("feed_forward_length", "intermediate_size")):
        if value(f"{arch}.{key}") is not None:
            config[name] = int(value(f"{arch}.{key}"))
    if arch == "llama":
        # Mixtral: llama with experts, whose width is feed_forward_length.
        if value("llama.expert_count") is None:
            raise RecorderError(f"{path}: a `llama` GGUF without experts is a dense Llama, not a family moetrace runs")
        config.update(num_local_experts=int(need("expert_count")), num_experts_per_tok=int(need("expert_used_count")))
    if arch == "qwen2moe":
        # A shared expert weighted by its sigmoid gate; q, k and v biases
        # (when the file has them); top-k weights not renormalised.
        config.update(
            num_experts=int(need("expert_count")),
            num_experts_per_tok=int(need("expert_used_count")),
            moe_intermediate_size=int(need("expert_feed_forward_length")),
            shared_expert_intermediate_size=int(need("expert_shared_feed_forward_length")),
            qkv_bias="blk.0.attn_q.bias" in tensors,
            norm_topk_prob=False,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    if arch == "gpt-oss":
        # What pipeline's gguf_gpt_oss.rs fills in: the metadata has no
        # layer_types, swiglu_limit or YaRN truncate (llama.cpp fixes them
        # for the architecture), so gpt-oss's published values.
        layers = int(need("block_count"))

        def f32(key, default=None):
            # An f32 as its shortest decimal (1e-6, not 9.99999997e-07), as
            # gguf_gpt_oss.rs reads these keys (ArchKeys::float).
            v = value(f"gpt-oss.{key}")
            return default if v is None else float(str(np.float32(v)))

        config.update(
            rms_norm_eps=f32("attention.layer_norm_rms_epsilon"),
            num_local_experts=int(need("expert_count")),
            num_experts_per_tok=int(need("expert_used_count")),
            intermediate_size=int(need("expert_feed_forward_length")),
            attention_bias=True,
            swiglu_limit=7.0,
            sliding_window=int(need("attention.sliding_window")),
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(layers)],
        )
        kind = value("gpt-oss.rope.scaling.type")
        if kind is not None:
            if kind != "yarn":
                raise RecorderError(f"{path}: `gpt-oss.rope.scaling.type` is `{kind}`: gpt-oss's rotation is yarn")
            config["rope_scaling"] = {
                "rope_type": "yarn",
                "factor": f32("rope.scaling.factor", float(need("rope.scaling.factor"))),
                "original_max_position_embeddings": int(need("rope.scaling.original_context_length")),
                "beta_fast": f32("rope.scaling.yarn_beta_fast", 32.0),
                "beta_slow": f32("rope.scaling.yarn_beta_slow", 1.0),
                "truncate": False,
            }
    if arch == "qwen3moe":
        config.update(
            num_experts=int(need("expert_count")),
            num_experts_per_tok=int(need("expert_used_count")),
            moe_intermediate_size=int(need("expert_feed_forward_length")),
            norm_topk_prob=True,
            decoder_sparse_step=1,
            mlp_only_layers=[],
        )
    return config


class _StepNodes:
    """The eval callback: asks for the named nodes and keeps a copy of each,
    by (name, layer, op)."""

    def __init__(self, ggml, layer_nodes, layers=None):
        self.ggml = ggml
        self.layer_nodes = layer_nodes
        # The layers recorded (None: all), and the layers whose output only
        # is recorded (the input of a recorded layer after them).
        self.layers = layers
        self.inputs = set() if layers is None else {layer - 1 for layer in layers} - set(layers)
        self.got = {}
        self.error = None
        self.seen_names = set()

    @staticmethod
    def split(name):
        """`Qcur-3` -> ('Qcur', 3); `result_norm` -> ('result_norm', None)."""
        base, dash, layer = name.rpartition("-")
        if dash and layer.isdigit():
            return base, int(layer)
        return name, None

    def _wanted(self, base, layer):
        """Whether node `base` of `layer` is recorded."""
        if layer is None:
            return base in MODEL_NODES
        if self.layers is None or layer in self.layers:
            return True
        return base == "l_out" and layer in self.inputs

    def _key(self, t):
        g = self.ggml
        base, layer = self.split(g.name(t))
        if g.op(t) == "RESHAPE" and base not in RESHAPED_NODES:
            return None  # a view of a node read anyway (Qcur before RoPE): no stage of its own
        if (base in self.layer_nodes) == (layer is not None) and self._wanted(base, layer):
            return base, layer
        # The output projection is not named: it is the MUL_MAT reading kqv_out.
        if g.op(t) == "MUL_MAT":
            srcs = g.sources(t)
            if len(srcs) > 1:
                src_base, src_layer = self.split(g.name(srcs[1]))
                if src_base == "kqv_out" and src_layer is not None and self._wanted("attn_out", src_layer):
                    return "attn_out", src_layer
        return None

    def eval(self, pointer, ask, _user):
        """llama.cpp's `cb_eval`: asked (ask true) whether a node is wanted,
        then told (ask false) once it is computed."""
        try:
            t = self.ggml.tensor(pointer)
            self.ggml.check_layout(t)
            self.seen_names.add(self.split(self.ggml.name(t))[0])
            key = self._key(t)
            if ask:
                return key is not None
            if key is not None:
                values = self.ggml.read(t)
                if values is not None:
                    self.got[(key[0], key[1], self.ggml.op(t))] = values
            return True
        except Exception as e:  # an exception must not cross into C
            self.error = e
            return False


def _is_moe(config):
    return "num_experts" in config or "num_local_experts" in config


def _unpermute(a, heads):
    """llama.cpp's `llama` q/k rows as Hugging Face orders them: its
    converter permutes each head's rows so that NORM RoPE's adjacent pairs
    (2i, 2i+1) are Hugging Face's (i, i + hd/2); the last axis, per head."""
    shape = a.shape
    half = shape[-1] // heads // 2
    return a.reshape(*shape[:-1], heads, half, 2).swapaxes(-1, -2).reshape(shape)


def _window(config, layer):
    """The sliding window of `layer` (None: it sees every earlier position)."""
    types = config.get("layer_types")
    if types and types[layer] == "sliding_attention":
        return config["sliding_window"]
    return None


def _window_seen(probs):
    """[T, 2] int32: the first and last position each row's softmax gave
    any weight to, over every head. llama.cpp's mask makes a masked
    position exactly 0 (exp of -inf); a seen one is 0 only where its score
    is over 100 below the row's largest, far outside any model's range."""
    seen = (probs > 0).any(axis=0)
    positions = seen.shape[1]
    first = seen.argmax(axis=1)
    last = positions - 1 - seen[:, ::-1].argmax(axis=1)
    return np.stack([first, last], axis=1).astype(np.int32)


def step_stages(got, config, start, t_len):
    """moetrace's stages of one step from llama.cpp's nodes: {(layer, stage):
    array}. llama.cpp's tensors are [ne3, ne2, ne1, ne0] with the token
    the slowest of ne1/ne2; attention scores are scaled here (llama.cpp
    scales inside its softmax) with masked entries 0, as moetrace writes
    them."""
    out = {}
    positions = start + t_len
    hd = config["head_dim"]
    scale = np.float32(1.0) / np.sqrt(np.float32(hd))
    gpt_oss = config["model_type"] == "gpt_oss"

    def node(name, layer, *ops):
        for op in ops:
            if (name, layer, op) in got:
                return got[(name, layer, op)]
        return None

    def rows(a):
        return a.reshape(t_len, -1)

    def put(layer, stage, a, shape=rows):
        if a is not None:
            out[(layer, stage)] = shape(a)

    put(None, "embedding", node("embd", None, "GET_ROWS", "SCALE", "CONT", "VIEW", "NONE"))
    put(None, "final_norm", node("result_norm", None, "MUL"))
    put(None, "lm_head", node("result_output", None, "MUL_MAT"))
    for layer in range(config["num_hidden_layers"]):
        put(layer, "attn_norm", node("attn_norm", layer, "MUL"))
        qkv = [node(n, layer, "MUL_MAT") for n in ("Qcur", "Kcur", "Vcur")]
        # llama's q and k come in the converter's permuted row order.
        heads = (config["num_attention_heads"], config["num_key_value_heads"])
        order = (lambda a, h: _unpermute(rows(a), h)) if config["model_type"] == "mixtral" else (lambda a, h: rows(a))
        if all(a is not None for a in qkv):
            qkv = [order(qkv[0], heads[0]), order(qkv[1], heads[1]), rows(qkv[2])]
            put(layer, "qkv_matmul", np.concatenate(qkv, axis=1))
        biased = [node(n, layer, "ADD") for n in ("Qcur", "Kcur", "Vcur")]
        if all(a is not None for a in biased):
            put(layer, "qkv_bias", np.concatenate([rows(a) for a in biased], axis=1))
        normed = [node(n, layer, "MUL") for n in ("Qcur_normed", "Kcur_normed")]
        if all(a is not None for a in normed):
            put(layer, "qk_norm", np.concatenate([rows(a) for a in normed], axis=1))
        put(layer, "q_post_rope", node("Qcur", layer, "ROPE"), lambda a: order(a, heads[0]))
        put(layer, "k_post_rope", node("Kcur", layer, "ROPE"), lambda a: order(a, heads[1]))
        causal = np.arange(positions)[None, :] > (start + np.arange(t_len))[:, None]
        window = _window(config, layer)
        if window is not None:
            # A sliding layer's row sees its last `window` positions (itself included).
            causal |= np.arange(positions)[None, :] <= (start + np.arange(t_len))[:, None] - window
        kq = node("kq", layer, "MUL_MAT")
        if kq is not None:
            scores = kq.reshape(-1, t_len, kq.shape[-1])[:, :, :positions].astype(np.float32) * scale
            put(layer, "attn_scores", np.where(causal[None], np.float32(0), scores), shape=lambda a: a)
        probs = node("kq_soft_max", layer, "SOFT_MAX")
        if probs is not None:
            probs = probs.reshape(-1, t_len, probs.shape[-1])[:, :, :positions]
            put(layer, "attn_softmax", probs, shape=lambda a: a)
            if gpt_oss:
                put(layer, "attn_window", _window_seen(probs), shape=lambda a: a)
        put(layer, "attention", node("kqv_out", layer, "CONT"))
        put(layer, "post_attn_residual", node("ffn_inp", layer, "ADD"))
        # gpt-oss: o_proj's bias added in attn_out, the post-attention norm
        # under its own name, biased router and experts, the fused SwiGLU.
        put(layer, "attn_out", node("attn_out", layer, "ADD" if gpt_oss else "MUL_MAT"))
        put(layer, "ffn_norm", node("attn_post_norm" if gpt_oss else "ffn_norm", layer, "MUL"))
        if _is_moe(config):
            k = config["num_experts_per_tok"]

            def slots(a):
                return a.reshape(t_len, k, -1)

            if gpt_oss:
                # Gating by softmax over the chosen: the biased logits are
                # named ffn_moe_probs (the ADD after ffn_moe_logits).
                put(layer, "moe_router_logits", node("ffn_moe_probs", layer, "ADD"))
                put(layer, "moe_router", node("ffn_moe_weights_softmax", layer, "RESHAPE"))
            else:
                put(layer, "moe_router_logits", node("ffn_moe_logits", layer, "MUL_MAT"))
                weights = node("ffn_moe_weights_norm", layer, "DIV")
                if weights is None and not config.get("norm_topk_prob", True):
                    weights = node("ffn_moe_weights", layer, "GET_ROWS")
                put(layer, "moe_router", weights)
            ids = node("ffn_moe_topk", layer, "VIEW", "ARGSORT", "TOP_K")
            put(layer, "moe_router_indices", None if ids is None else ids.astype(np.int32))
            biased, op = ("_biased", "ADD_ID") if gpt_oss else ("", "MUL_MAT_ID")
            put(layer, "moe_expert_gate", node("ffn_moe_gate" + biased, layer, op), slots)
            put(layer, "moe_expert_up", node("ffn_moe_up" + biased, layer, op), slots)
            swiglu = "ffn_moe_swiglu_oai" if gpt_oss else "ffn_moe_swiglu"
            put(layer, "moe_expert_swigl", node(swiglu, layer, "GLU"), slots)
            put(layer, "moe_expert_out", node("ffn_moe_down" + biased, layer, op), slots)
            if "shared_expert_intermediate_size" in config:
                # llama.cpp's shared expert is a plain FFN beside the routed
                # ones; its ffn_out adds the gated shared output to
                # ffn_moe_out (routed only): moetrace's moe_ffn_out.
                put(layer, "moe_shared_gate", node("ffn_gate", layer, "MUL_MAT"))
                put(layer, "moe_shared_up", node("ffn_up", layer, "MUL_MAT"))
                put(layer, "moe_shared_swigl", node("ffn_swiglu", layer, "GLU"))
                put(layer, "moe_shared_out", node("ffn_shexp", layer, "MUL_MAT"))
                put(layer, "moe_shared_logit", node("ffn_shexp_gate_inp", layer, "MUL_MAT"))
                put(layer, "moe_shared_weight", node("ffn_shexp_gate", layer, "DIV"))
                put(layer, "moe_ffn_out", node("ffn_out", layer, "ADD"))
            else:
                put(layer, "moe_ffn_out", node("ffn_moe_out", layer, "ADD", "CONT", "VIEW"))
        else:
            put(layer, "ffn_gate", node("ffn_gate", layer, "MUL_MAT"))
            put(layer, "ffn_up", node("ffn_up", layer, "MUL_MAT"))
            put(layer, "ffn_swigl", node("ffn_swiglu", layer, "GLU"))
            put(layer, "ffn_out", node("ffn_out", layer, "MUL_MAT"))
        put(layer, "post_ffn_residual", node("l_out", layer, "ADD"))
    return out


def _expected_stages(config, layers=None):
    """The stages a capture of this model holds, (layer, stage), of every
    layer or of `layers`."""
    model = [(None, s) for s in ("embedding", "final_norm", "lm_head")]
    attention = ["attn_norm", "qkv_matmul", "q_post_rope", "k_post_rope", "attn_scores", "attn_softmax",
                 "attention", "attn_out", "post_attn_residual", "ffn_norm", "post_ffn_residual"]  # fmt: skip
    attention += ["qkv_bias"] if config.get("qkv_bias") or config["model_type"] == "gpt_oss" else []
    attention += ["attn_window", "attn_sink"] if config["model_type"] == "gpt_oss" else []
    attention += ["qk_norm"] if config["model_type"].startswith("qwen3") else []
    if _is_moe(config):
        ffn = ["moe_router_logits", "moe_router", "moe_router_indices", "moe_expert_gate", "moe_expert_up",
               "moe_expert_swigl", "moe_expert_out", "moe_ffn_out"]  # fmt: skip
        ffn += ["moe_expert_clamp"] if config["model_type"] == "gpt_oss" else []
        if "shared_expert_intermediate_size" in config:
            ffn += ["moe_shared_gate", "moe_shared_up", "moe_shared_swigl", "moe_shared_out", "moe_shared_logit",
                    "moe_shared_weight"]  # fmt: skip
    else:
        ffn = ["ffn_gate", "ffn_up", "ffn_silu", "ffn_swigl", "ffn_out"]
    layers = range(config["num_hidden_layers"]) if layers is None else sorted(layers)
    return model + [(layer, s) for layer in layers for s in attention + ffn]


def record(
    model_path, out_dir, prompt=None, text=None, generate=1, gpu_layers=0, kv_type="f16", threads=None,
    extra_bufts=True, layers=None, log=None,
):  # fmt: skip
    """Greedy generation of `generate` tokens from `prompt` (token ids) or
    `text` through llama.cpp, every stage it names captured; step 0 is the
    prompt. `extra_bufts` False keeps the weights as loaded (llama.cpp's
    `use_extra_bufts`: no repacking into CPU-specific layouts such as AMX
    tiles or AVX2 interleaved blocks). `layers` (a set) records only those
    layers' stages, and the output of the layer before each (its input),
    besides the embedding, final norm and logits. Returns (generated ids,
    {stage: why not recorded})."""
    llama_cpp, _ggml = _bindings()
    log = log or (lambda message: print(message, file=sys.stderr))
    if not os.path.isfile(model_path):
        raise RecorderError(f"{model_path}: no such file")
    if kv_type not in ("f16", "f32"):
        raise RecorderError(f"--kv-type {kv_type!r}: valid types are f16 (llama.cpp's default) and f32")
    if generate < 0:
        raise RecorderError(f"--generate {generate}: give 0 or more tokens")
    config = gguf_config(model_path)
    n_layers = config["num_hidden_layers"]
    if layers is not None and not all(0 <= layer < n_layers for layer in layers):
        raise RecorderError(f"--layers {sorted(layers)}: the model has layers 0..{n_layers - 1}")
    ggml = Ggml(_ggml.libggml)
    _quiet(llama_cpp)
    llama_cpp.llama_backend_init()
    if gpu_layers and not llama_cpp.llama_supports_gpu_offload():
        raise RecorderError(
            f"--gpu-layers {gpu_layers}: this llama.cpp build has no GPU backend (build llama-cpp-python with "
            "CMAKE_ARGS=-DGGML_CUDA=on, or record on the CPU without --gpu-layers)"
        )
    mparams = llama_cpp.llama_model_default_params()
    mparams.n_gpu_layers = gpu_layers
    mparams.use_extra_bufts = bool(extra_bufts)
    model = llama_cpp.llama_model_load_from_file(os.fsencode(model_path), mparams)
    if not model:
        raise RecorderError(f"{model_path}: llama.cpp could not load it")
    ctx = None
    try:
        vocab = llama_cpp.llama_model_get_vocab(model)
        if text is not None:
            prompt = _tokenize(llama_cpp, vocab, text)
        prompt = [int(t) for t in prompt or []]
        if not prompt:
            raise RecorderError("the prompt is empty: give --prompt ids or --text")
        n_vocab = llama_cpp.llama_vocab_n_tokens(vocab)
        bad = [t for t in prompt if not 0 <= t < n_vocab]
        if bad:
            raise RecorderError(f"prompt token ids {bad} are outside the vocabulary (0..{n_vocab - 1})")
        nodes = _StepNodes(ggml, _layer_nodes(config), layers)
        cparams = llama_cpp.llama_context_default_params()
        total = len(prompt) + max(generate, 1)
        cparams.n_ctx = max(256, -(-total // 256) * 256)
        cparams.n_batch = cparams.n_ubatch = max(512, len(prompt))
        cparams.n_seq_max = 1
        cparams.n_threads = cparams.n_threads_batch = threads or os.cpu_count() or 1
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cparams.type_k = cparams.type_v = llama_cpp.GGML_TYPE_F16 if kv_type == "f16" else llama_cpp.GGML_TYPE_F32
        callback = llama_cpp.ggml_backend_sched_eval_callback(nodes.eval)  # kept alive until the end
        cparams.cb_eval = callback
        cparams.cb_eval_user_data = None
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            raise RecorderError("llama.cpp could not create a context for the model")
        device = f"cuda offload of {gpu_layers} layers" if gpu_layers else "cpu"
        device += "" if extra_bufts else " without repacked weights"
        dtype = f"llama.cpp {device}, kv {kv_type}"
        source = os.path.abspath(model_path)
        missing = {}
        generated = []
        with Capture(out_dir, config=config, prompt=prompt, backend="llama.cpp", dtype=dtype, source=source,
                     producer=f"moetrace_capture.llamacpp (llama-cpp-python {llama_cpp.__version__})") as cap:  # fmt: skip
            tokens, start = prompt, 0
            for step in range(max(1, generate)):
                nodes.got = {}
                _decode(llama_cpp, ctx, tokens, start)
                if nodes.error is not None:
                    raise nodes.error
                stages = step_stages(nodes.got, config, start, len(tokens))
                if step == 0:
                    missing = _missing(config, stages, nodes.seen_names, layers)
                    for stage, why in sorted(missing.items()):
                        log(f"not recorded: {stage}: {why}")
                cap.begin_step(step, start, tokens)
                for (layer, stage), array in stages.items():
                    cap.save(step, layer, stage, array)
                logits = stages[(None, "lm_head")] if (None, "lm_head") in stages else None
                if logits is None:
                    raise RecorderError("llama.cpp's result_output was not recorded: the greedy token is unknown")
                next_id = int(np.argmax(logits[-1]))
                generated.append(next_id)
                log(f"step {step}: {len(tokens)} token(s) at position {start}, {len(stages)} tensors, next token {next_id}")
                start += len(tokens)
                tokens = [next_id]
            cap.generated = generated[:generate]
        return generated[:generate], missing
    finally:
        if ctx:
            llama_cpp.llama_free(ctx)
        llama_cpp.llama_model_free(model)


def _missing(config, stages, seen, layers=None):
    """Every stage of the recorded layers the recording lacks, with why."""
    expected = {stage for _, stage in _expected_stages(config, layers)}
    have = {stage for _, stage in stages}
    unknown = sorted(n for n in seen if n not in _layer_nodes(config) and n not in MODEL_NODES)
    missing = {}
    node_of = {**NODE_OF, **(NODE_OF_GPT_OSS if config["model_type"] == "gpt_oss" else {})}
    for stage in sorted(expected - have):
        if stage in NOT_RECORDED:
            missing[stage] = NOT_RECORDED[stage]
        else:
            shown = ", ".join(unknown[:40]) + (f" and {len(unknown) - 40} more" if len(unknown) > 40 else "")
            missing[stage] = (
                f"expected llama.cpp node {node_of.get(stage, '?')}, which this build's graph does not have "
                f"(its other node names: {shown or 'none'})"
            )
    return missing


def _decode(llama_cpp, ctx, tokens, start):
    """One llama_decode of `tokens` at positions start.., all rows output."""
    batch = llama_cpp.llama_batch_init(len(tokens), 0, 1)
    try:
        batch.n_tokens = len(tokens)
        for i, token in enumerate(tokens):
            batch.token[i] = token
            batch.pos[i] = start + i
            batch.n_seq_id[i] = 1
            batch.seq_id[i][0] = 0
            batch.logits[i] = 1
        rc = llama_cpp.llama_decode(ctx, batch)
        if rc != 0:
            raise RecorderError(f"llama_decode returned {rc} at position {start}")
    finally:
        llama_cpp.llama_batch_free(batch)


def _tokenize(llama_cpp, vocab, text):
    data = text.encode("utf-8")
    room = len(data) + 16
    ids = (llama_cpp.llama_token * room)()
    n = llama_cpp.llama_tokenize(vocab, data, len(data), ids, room, True, True)
    if n < 0:
        raise RecorderError(f"the text tokenizes to more than {room} tokens")
    return list(ids[:n])


def _bindings():
    """llama-cpp-python's low-level bindings (llama_cpp.llama_cpp) and its
    ggml library, with `__version__`. Its high-level API (the package's
    __init__) needs diskcache and jinja2, which the recorder does not use:
    where they are missing, the bindings are imported alone."""
    try:
        import llama_cpp
        from llama_cpp import _ggml

        return llama_cpp, _ggml
    except ImportError as first:
        import importlib.util
        import re
        import types

        spec = importlib.util.find_spec("llama_cpp")
        if spec is None or not spec.submodule_search_locations:
            raise
        package = types.ModuleType("llama_cpp")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["llama_cpp"] = package
        try:
            from llama_cpp import _ggml
            from llama_cpp import llama_cpp as low
        except ImportError:
            del sys.modules["llama_cpp"]
            raise first from None
        init = os.path.join(package.__path__[0], "__init__.py")
        with open(init, encoding="utf-8") as f:
            version = re.search(r'__version__ = "([^"]+)"', f.read())
        low.__version__ = version.group(1) if version else "unknown"
        return low, _ggml


_LOG_SINK = None


def _quiet(llama_cpp):
    """Keeps llama.cpp's own log off stderr unless MOETRACE_LLAMA_LOG is set."""
    global _LOG_SINK
    if os.environ.get("MOETRACE_LLAMA_LOG") or _LOG_SINK is not None:
        return
    _LOG_SINK = llama_cpp.llama_log_callback(lambda level, text, user: None)
    llama_cpp.llama_log_set(_LOG_SINK, ctypes.c_void_p())


def _layers(text):
    """`0-3,47` -> {0, 1, 2, 3, 47}."""
    out = set()
    try:
        for part in (p.strip() for p in text.split(",") if p.strip()):
            first, dash, last = part.partition("-")
            out.update(range(int(first), int(last if dash else first) + 1))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give layers as 0-3,47") from None
    if not out:
        raise argparse.ArgumentTypeError(f"{text!r} names no layer")
    return out


def _ids(text):
    try:
        return [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: give token ids separated by commas, e.g. 1,17,423") from None


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m moetrace_capture.llamacpp",
        description="Record every stage llama.cpp names while it generates from a GGUF, as a moetrace capture.",
    )
    parser.add_argument("model", help="the GGUF file")
    parser.add_argument("out", help="the capture folder to write (absent, empty, or a capture to replace)")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--prompt", type=_ids, help="token ids, e.g. 1,17,423")
    which.add_argument("--text", help="a text, tokenized by the GGUF's tokenizer (special tokens parsed)")
    parser.add_argument("--generate", type=int, default=1, help="greedy tokens after the prompt (default 1)")
    parser.add_argument("--gpu-layers", type=int, default=0, help="layers offloaded to the GPU (99: all; default 0)")
    parser.add_argument("--kv-type", default="f16", help="the KV cache's element type: f16 (default) or f32")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: all)")
    parser.add_argument(
        "--layers", type=_layers, default=None,
        help="record only these layers, e.g. 0-3,47 (and each one's input); default: all",
    )  # fmt: skip
    parser.add_argument(
        "--no-extra-bufts", action="store_true",
        help="keep the weights as loaded: no repacking for AMX or AVX2 (llama.cpp's use_extra_bufts off)",
    )  # fmt: skip
    args = parser.parse_args(argv)
    try:
        generated, missing = record(
            args.model, args.out, prompt=args.prompt, text=args.text, generate=args.generate,
            gpu_layers=args.gpu_layers, kv_type=args.kv_type, threads=args.threads,
            extra_bufts=not args.no_extra_bufts, layers=args.layers,
        )  # fmt: skip
    except ImportError as e:
        print(f"error: {e}: install llama-cpp-python 0.3.x and gguf (pip install llama-cpp-python gguf)", file=sys.stderr)
        return 2
    except (RecorderError, ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out}: generated {generated}; {len(missing)} stage(s) not recorded")
    return 0


if __name__ == "__main__":
    sys.exit(main())
