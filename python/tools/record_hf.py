"""Captures a Hugging Face transformers Qwen3 / Qwen3-MoE checkpoint at
every moetrace stage while it generates greedily (moetrace_capture.hf).

Usage: record_hf.py MODEL_DIR OUT_DIR [--dtype float64|float32|bfloat16]
       [--device cpu|cuda] [--prompt 1,17,423] [--generate 8]
Then: moetrace diff OUT_DIR <a moetrace capture of the same prompt>.
"""
import argparse
import os
import sys

import torch
from transformers import AutoModelForCausalLM

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
from moetrace_capture import hf  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("model")
parser.add_argument("out")
parser.add_argument("--dtype", default="float64", choices=["float64", "float32", "bfloat16"])
parser.add_argument("--device", default="cpu")
parser.add_argument("--prompt", default="1,17,423,45,300,5,77,100,2")
parser.add_argument("--generate", type=int, default=8)
args = parser.parse_args()
dtype = getattr(torch, args.dtype)
try:
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="eager",
                                                 experts_implementation="eager")
except TypeError:
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, attn_implementation="eager")
model.to(args.device).eval()
prompt = [int(t) for t in args.prompt.split(",")]
generated = hf.record(model, args.out, prompt=prompt, generate=args.generate, source=os.path.abspath(args.model))
print(f"captured {args.out}: prompt {prompt}, generated {generated} ({args.dtype} on {args.device})")
