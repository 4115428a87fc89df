"""A GGUF of a Hugging Face checkpoint written by llama.cpp's own converter
(convert_hf_to_gguf.py), so every tensor, its layout (the q/k row
permutation of the `llama` architecture, experts stacked per projection)
and every hyper-parameter key is what llama.cpp writes. moetrace's tiny
fixtures have no tokenizer, which the converter requires: they get a
stand-in vocabulary (one token per id, `<tN>`); nothing else is changed.

Usage: LLAMA_CPP=DIR make_gguf_with_llama_cpp.py MODEL_DIR OUT.gguf [--outtype bf16]
DIR is a llama.cpp source tree (convert_hf_to_gguf.py, conversion/, gguf-py/;
the llama-cpp-python sdist's vendor/llama.cpp). Needs torch.
"""
import os
import sys

llama_cpp = os.environ["LLAMA_CPP"]
sys.path.insert(0, llama_cpp)
sys.path.insert(1, os.path.join(llama_cpp, "gguf-py"))

import gguf  # noqa: E402
from conversion import base  # noqa: E402


def stand_in_vocab(self):
    """One normal token per id: the ids are what the fixtures' prompts use."""
    n = self.hparams["vocab_size"]
    self.gguf_writer.add_tokenizer_model("llama")
    self.gguf_writer.add_tokenizer_pre("default")
    self.gguf_writer.add_token_list([f"<t{i}>" for i in range(n)])
    self.gguf_writer.add_token_scores([0.0] * n)
    self.gguf_writer.add_token_types([gguf.TokenType.NORMAL] * n)


if not any(os.path.isfile(os.path.join(sys.argv[1], f)) for f in ("tokenizer.json", "tokenizer.model")):
    # Whichever vocabulary reader the architecture's class calls.
    for reader in ("_set_vocab_sentencepiece", "_set_vocab_gpt2", "_set_vocab_qwen"):
        setattr(base.TextModel, reader, stand_in_vocab)
sys.argv = [sys.argv[0], sys.argv[1], "--outfile", sys.argv[2]] + (sys.argv[3:] or ["--outtype", "bf16"])
import convert_hf_to_gguf  # noqa: E402

convert_hf_to_gguf.main()
