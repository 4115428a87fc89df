"""Records Hugging Face transformers' token ids for a set of texts and chats
with a tokenizer folder (tokenizer.json + tokenizer_config.json), for
tests/tokenizer.rs. Usage: record_tokenizer_ids.py TOKENIZER_DIR OUT.json"""
import json
import sys

import transformers
from transformers import AutoTokenizer

TEXTS = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "混合专家模型在每个词元上只激活少数专家。",
    "Routing flips 🔀 on near-ties 🤏, NaN logits 💥 and emoji with ZWJ 👩‍💻.",
    "def top_k(x, k):\n    return sorted(range(len(x)), key=lambda i: -x[i])[:k]\n",
    "<|im_start|>user\nspecial tokens in text<|im_end|>\n<|endoftext|>",
    "  leading spaces, tabs\tand\n\nnewlines  ",
]
CHATS = [
    [{"role": "user", "content": "Which expert fires first?"}],
    [
        {"role": "system", "content": "You are a careful GPU kernel reviewer."},
        {"role": "user", "content": "Why do my MoE logits turn into NaN after layer 12? 为什么？"},
    ],
]

tok = AutoTokenizer.from_pretrained(sys.argv[1])
texts = [{"text": t, "ids": tok(t)["input_ids"]} for t in TEXTS]
chats = []
for messages in CHATS:
    rendered = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):
        ids = ids["input_ids"]
    chats.append({"messages": messages, "rendered": rendered, "ids": list(ids)})
out = {"transformers": transformers.__version__, "texts": texts, "chats": chats}
with open(sys.argv[2], "w", encoding="utf-8") as f:
    json.dump(out, f, ensure_ascii=False, indent=1)
    f.write("\n")
print(f"recorded {len(texts)} texts and {len(chats)} chats with transformers {transformers.__version__}")
