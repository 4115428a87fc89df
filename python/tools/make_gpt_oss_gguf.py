#!/usr/bin/env python3
"""Write a random-weight gpt-oss GGUF at gpt-oss-20b's dimensions, for llama-bench speed runs.

The file is laid out as llama.cpp's convert_hf_to_gguf.py writes a gpt-oss checkpoint with
`--outtype bf16` (tests/fixtures/tiny-gpt-oss-oracle/model.gguf is one): experts MXFP4 (17-byte
blocks of 32 values: an e8m0 scale, then 16 bytes of e2m1 pairs), the other matrices BF16, norms,
biases, sinks and the router F32; metadata under `gpt-oss.` (sliding window, YaRN). The moetrace
preset `gpt-oss-20b` has the same types, so a token reads the same bytes on both sides.

Values do not matter for speed, only that they are finite and spread the tokens over the experts:
each matrix is one random block tiled cyclically (a prime number of values, so rows are not copies);
MXFP4 blocks take random nibbles under a scale that gives each matrix a std of 1/sqrt(fan_in); the
router is F32 and random per layer. The tokenizer is shared/tools/llamacpp/make_gguf.py's synthetic
byte-level BPE, scaled to gpt-oss's 201,088 tokens.

  python3 make_gpt_oss_gguf.py OUT.gguf [--layers 24] [--hidden 2880] [--experts 32] ...

Needs numpy and gguf-py; finds ../shared/tools (or $MOETRACE_SHARED_TOOLS, or the copy
scripts/gpu-build.sh makes under .gpu/llamacpp/tools) for make_gguf.py's vocabulary.
"""
import argparse
import math
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.abspath(os.path.join(HERE, "..", ".."))
for tools in (os.environ.get("MOETRACE_SHARED_TOOLS"), os.path.join(ROOT, "..", "shared", "tools"),
              os.path.join(ROOT, ".gpu", "llamacpp", "tools")):
    if tools and os.path.isfile(os.path.join(tools, "llamacpp", "make_gguf.py")):
        sys.path[:0] = [tools, os.path.join(tools, "llamacpp")]
        break
else:
    sys.exit("make_gpt_oss_gguf.py: shared/tools/llamacpp/make_gguf.py not found "
             "(set MOETRACE_SHARED_TOOLS to the folder that holds llamacpp/make_gguf.py)")
import gguf  # noqa: E402
from gguf_fixture import tensor_order  # noqa: E402
from make_gguf import make_vocab_big  # noqa: E402

ARCH = "gpt-oss"
Q = gguf.GGMLQuantizationType
# e2m1 magnitudes; uniform random nibbles have this RMS
E2M1 = np.array([0, 0.5, 1, 1.5, 2, 3, 4, 6], np.float64)
E2M1_RMS = math.sqrt(float(np.mean(E2M1 ** 2)))
MXFP4_BLOCK = (32, 17)
BF16_PRIME = 1048573
MXFP4_PRIME_BLOCKS = 65521


def mxfp4_block(rng, fan_in):
    """Random MXFP4 blocks whose decoded values have a std of about 1/sqrt(fan_in)."""
    n = MXFP4_PRIME_BLOCKS
    scale = 127 + round(math.log2(1.0 / math.sqrt(fan_in) / E2M1_RMS))
    b = np.empty((n, 17), np.uint8)
    b[:, 0] = scale
    b[:, 1:] = rng.integers(0, 256, size=(n, 16), dtype=np.uint8)
    return b.reshape(-1)


def bf16_block(base, fan_in):
    x = base[:BF16_PRIME] * np.float32(1.0 / math.sqrt(fan_in))
    return (x.view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)   # bf16 by truncation


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out")
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--vocab", type=int, default=201088)
    ap.add_argument("--hidden", type=int, default=2880)
    ap.add_argument("--heads", type=int, default=64)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=64)
    ap.add_argument("--experts", type=int, default=32)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--moe-inter", type=int, default=2880)
    ap.add_argument("--window", type=int, default=128)
    ap.add_argument("--context", type=int, default=131072)
    ap.add_argument("--seed", type=int, default=7)
    a = ap.parse_args()
    if a.hidden % 32 or a.moe_inter % 32:
        sys.exit(f"MXFP4 rows are blocks of 32 values: hidden {a.hidden} and moe-inter {a.moe_inter} must divide by 32")
    t0 = time.time()
    V, H, L, nh, nkv, hd, E, I = a.vocab, a.hidden, a.layers, a.heads, a.kv_heads, a.head_dim, a.experts, a.moe_inter
    rng = np.random.default_rng(a.seed)

    # numpy-order shapes (reversed ggml ne), type, fan_in (None: ones; 0: zeros; "router")
    shapes = {"token_embd.weight": ((V, H), Q.BF16, 1.0), "output_norm.weight": ((H,), Q.F32, None),
              "output.weight": ((V, H), Q.BF16, H)}
    for i in range(L):
        p = f"blk.{i}."
        shapes.update({
            p + "attn_norm.weight": ((H,), Q.F32, None), p + "post_attention_norm.weight": ((H,), Q.F32, None),
            p + "attn_q.weight": ((nh * hd, H), Q.BF16, H), p + "attn_q.bias": ((nh * hd,), Q.F32, 0),
            p + "attn_k.weight": ((nkv * hd, H), Q.BF16, H), p + "attn_k.bias": ((nkv * hd,), Q.F32, 0),
            p + "attn_v.weight": ((nkv * hd, H), Q.BF16, H), p + "attn_v.bias": ((nkv * hd,), Q.F32, 0),
            p + "attn_output.weight": ((H, nh * hd), Q.BF16, nh * hd), p + "attn_output.bias": ((H,), Q.F32, 0),
            p + "attn_sinks.weight": ((nh,), Q.F32, 0),
            p + "ffn_gate_inp.weight": ((E, H), Q.F32, "router"), p + "ffn_gate_inp.bias": ((E,), Q.F32, 0),
            p + "ffn_gate_exps.weight": ((E, I, H), Q.MXFP4, H), p + "ffn_gate_exps.bias": ((E, I), Q.F32, 0),
            p + "ffn_up_exps.weight": ((E, I, H), Q.MXFP4, H), p + "ffn_up_exps.bias": ((E, I), Q.F32, 0),
            p + "ffn_down_exps.weight": ((E, H, I), Q.MXFP4, I), p + "ffn_down_exps.bias": ((E, H), Q.F32, 0),
        })

    def nbytes(name):
        shp, t, _ = shapes[name]
        n = int(np.prod(shp))
        return {Q.F32: 4 * n, Q.BF16: 2 * n, Q.MXFP4: n // MXFP4_BLOCK[0] * MXFP4_BLOCK[1]}[t]

    base = rng.standard_normal(BF16_PRIME).astype(np.float32)
    blocks = {}

    def block(t, fan_in):
        if (t, fan_in) not in blocks:
            blocks[(t, fan_in)] = np.ascontiguousarray(
                mxfp4_block(rng, fan_in) if t == Q.MXFP4 else bf16_block(base, fan_in))
        return blocks[(t, fan_in)]

    w = gguf.GGUFWriter(a.out, ARCH)
    w.add_type("model")
    w.add_name(f"synthetic-gpt-oss-{L}l")
    w.add_block_count(L)
    w.add_context_length(a.context)
    w.add_embedding_length(H)
    w.add_feed_forward_length(I)
    w.add_head_count(nh)
    w.add_head_count_kv(nkv)
    w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
    w.add_rope_scaling_factor(32.0)
    w.add_rope_scaling_orig_ctx_len(4096)
    w.add_float32(f"{ARCH}.rope.scaling.yarn_beta_fast", 32.0)
    w.add_float32(f"{ARCH}.rope.scaling.yarn_beta_slow", 1.0)
    w.add_rope_freq_base(150000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_expert_count(E)
    w.add_expert_used_count(a.topk)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_MXFP4_MOE)
    w.add_sliding_window(a.window)
    w.add_expert_feed_forward_length(I)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, toktypes, merges, sp = make_vocab_big(V)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(toktypes)
    w.add_token_merges(merges)
    w.add_eos_token_id(sp["eos"])
    w.add_pad_token_id(sp["pad"])
    w.add_bos_token_id(sp["bos"])
    w.add_add_bos_token(False)
    order = tensor_order(list(shapes))
    for name in order:
        shp, t, _ = shapes[name]
        if t == Q.F32:
            w.add_tensor_info(name, shp, np.dtype(np.float32), nbytes(name))
        else:
            w.add_tensor_info(name, shp, np.dtype(np.float32), nbytes(name), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    fout = w.fout[0]
    total = 0
    for name in order:
        shp, t, fan_in = shapes[name]
        nb = nbytes(name)
        w.write_padding(fout, fout.tell())
        if fan_in is None:
            np.ones(shp, np.float32).tofile(fout)
        elif fan_in == 0:
            np.zeros(shp, np.float32).tofile(fout)
        elif fan_in == "router":
            (rng.standard_normal(shp, dtype=np.float32) * np.float32(3.0 / math.sqrt(H))).tofile(fout)
        else:
            b = memoryview(block(t, fan_in))
            k, r = divmod(nb, len(b))
            for _ in range(k):
                fout.write(b)
            fout.write(b[:r])
        total += nb
    w.write_padding(fout, fout.tell())
    w.close()
    print(f"wrote {a.out}: gpt-oss {L} layers, {len(order)} tensors, {total / 1e9:.3f} GB of tensor data, "
          f"file {os.path.getsize(a.out) / 1e9:.3f} GB in {time.time() - t0:.1f} s", flush=True)


if __name__ == "__main__":
    main()
