"""Recording any PyTorch engine for `moetrace check`, through forward
hooks only: the recipe in python/README.md ("Recording your own engine"),
run here on a Hugging Face model treated as an unknown engine (no
moetrace_capture.hf): each hook maps one module's output to one stage.

    python python/examples/record_with_hooks.py MODEL_DIR OUT --prompt 1,17,42 --generate 3
    moetrace check OUT --model MODEL_DIR

What a hook sees is what the engine computed, in the engine's dtype; the
stages recorded here are the ones a module returns as a whole tensor
(norms, the attention and MLP blocks' outputs, the logits); the residual
sums are added in the hook of the block after them. `moetrace check`
checks every stage whose inputs were recorded too and lists the others
with what they need: record more of them (q/k/v, the router, the
experts) to check more.
"""

import argparse

import torch
from transformers import AutoModelForCausalLM

from moetrace_capture import Capture


def record(model, out, prompt, generate, dtype_name):
    """Greedy generation with a hook per mapped module; returns the tokens."""
    inner = model.model
    config = model.config.to_dict()
    generated, tokens, start, past = [], list(prompt), 0, None
    with Capture(out, config=config, prompt=prompt, backend="my-engine", dtype=dtype_name) as cap:
        for step in range(max(1, generate)):
            cap.begin_step(step, start, tokens)
            got = {}

            def keep(key):
                return lambda module, inputs, output: got.__setitem__(
                    key, (output[0] if isinstance(output, tuple) else output)[0].detach())

            # The mapping: (module, stage, layer). This is the part to write
            # for another engine: its modules' names, moetrace's stages.
            hooks = [(inner.embed_tokens, "embedding", None), (inner.norm, "final_norm", None),
                     (model.lm_head, "lm_head", None)]
            for i, layer in enumerate(inner.layers):
                hooks += [(layer.input_layernorm, "attn_norm", i), (layer.self_attn.o_proj, "attn_out", i),
                          (layer.post_attention_layernorm, "ffn_norm", i), (layer, "post_ffn_residual", i)]
            handles = [m.register_forward_hook(keep((stage, layer))) for m, stage, layer in hooks]
            try:
                with torch.no_grad():
                    result = model(torch.tensor([tokens]), past_key_values=past, use_cache=True)
            finally:
                for h in handles:
                    h.remove()
            for (stage, layer), value in got.items():
                cap.save(step, layer, stage, value)
            # A sum no module returns: the residual after attention.
            for i in range(len(inner.layers)):
                layer_input = got[("embedding", None)] if i == 0 else got[("post_ffn_residual", i - 1)]
                cap.save(step, i, "post_attn_residual", layer_input + got[("attn_out", i)])
            past = result.past_key_values
            next_id = int(result.logits[0, -1].argmax())
            generated.append(next_id)
            start += len(tokens)
            tokens = [next_id]
        cap.generated = generated[:generate]
    return generated[:generate]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("out")
    parser.add_argument("--prompt", required=True, help="token ids, comma separated")
    parser.add_argument("--generate", type=int, default=1)
    parser.add_argument("--dtype", default="float64", choices=["float64", "float32", "bfloat16"])
    args = parser.parse_args()
    dtype = getattr(torch, args.dtype)
    try:  # transformers 5: the per-expert loop, which float64 needs
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, experts_implementation="eager")
    except TypeError:
        model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
    model.eval()
    prompt = [int(t) for t in args.prompt.split(",")]
    print(record(model, args.out, prompt, args.generate, args.dtype))


if __name__ == "__main__":
    main()
