"""Routing returned by other engines, written as a moetrace capture that
`routing: Replay("dir")` replays (expert ids forced, each token's weights
from the replaying run's own router logits at those ids unless given).

Layouts read (numpy .npy files):
- vLLM (`--enable-return-routed-experts`): `prompt_routed_experts`
  [prompt_len, num_moe_layers, top_k] and `routed_experts`
  [gen_len, num_moe_layers, top_k], int16 expert ids: give them as
  `--prompt-ids` and `--ids`.
- SGLang's routed-experts export: one [tokens, layers, top_k] int32 array
  over the prompt and the generated tokens (`--ids`), router weights of the
  same shape where given (`--weights`).
The layer axis holds the MoE layers in order (or every layer, dense ones
ignored). Step 0 is the prompt; step s feeds generated token s - 1, whose
row follows the prompt's.

    python -m moetrace_capture.routing CONFIG_JSON OUT --prompt 1,17,423 \\
        --generated 5,9,2 --ids routed.npy [--prompt-ids prompt_routed.npy] \\
        [--weights weights.npy] [--backend vllm]
"""

import argparse
import json
import sys

import numpy as np

from .writer import Capture, CaptureError


def moe_layers(config):
    """The MoE layers of a Hugging Face config, as moetrace decides them."""
    experts = config.get("num_experts") or config.get("num_local_experts") or 0
    step = config.get("decoder_sparse_step") or 1
    dense = set(config.get("mlp_only_layers") or [])
    layers = config["num_hidden_layers"]
    return [l for l in range(layers) if experts > 0 and l not in dense and (l + 1) % step == 0]


def write_routing_capture(out_dir, config, prompt, generated, ids, prompt_ids=None, weights=None, backend="engine"):
    """Writes the routing of `prompt` and `generated` (token ids) as a
    capture in `out_dir`. `ids` is [tokens, layers, k] over the prompt and
    the generated tokens, or, with `prompt_ids` (the prompt's), over the
    generated ones only. Returns the number of steps written."""
    ids = np.asarray(ids)
    if prompt_ids is not None:
        ids = np.concatenate([np.asarray(prompt_ids), ids], axis=0)
    if ids.ndim != 3:
        raise CaptureError(f"expert ids must be [tokens, layers, top_k], got shape {ids.shape}")
    if weights is not None:
        weights = np.asarray(weights, dtype=np.float32)
        if weights.shape != ids.shape:
            raise CaptureError(f"weights {weights.shape} and expert ids {ids.shape} differ in shape")
    moe = moe_layers(config)
    if ids.shape[1] == len(moe):
        rows_of = {layer: i for i, layer in enumerate(moe)}
    elif ids.shape[1] == config["num_hidden_layers"]:
        rows_of = {layer: layer for layer in moe}
    else:
        raise CaptureError(
            f"the layer axis has {ids.shape[1]} entries; the model has {len(moe)} MoE layers of "
            f"{config['num_hidden_layers']}"
        )
    experts = config.get("num_experts") or config.get("num_local_experts")
    if ids.size and (ids.min() < 0 or ids.max() >= experts):
        raise CaptureError(f"expert ids must lie in 0..{experts}, found {ids.min()}..{ids.max()}")
    prompt, generated = [int(t) for t in prompt], [int(t) for t in generated]
    if ids.shape[0] < len(prompt):
        raise CaptureError(f"{ids.shape[0]} rows of routing, fewer than the prompt's {len(prompt)} tokens")
    # Step s >= 1 feeds generated[s - 1]; its routing is row len(prompt) + s - 1.
    steps = 1 + min(len(generated), ids.shape[0] - len(prompt))
    with Capture(out_dir, config=config, prompt=prompt, backend=backend, dtype="int32",
                 source="moetrace_capture.routing") as cap:
        for step in range(steps):
            start = 0 if step == 0 else len(prompt) + step - 1
            tokens = prompt if step == 0 else [generated[step - 1]]
            rows = slice(start, start + len(tokens))
            cap.begin_step(step, start, tokens)
            for layer, row in rows_of.items():
                cap.save(step, layer, "moe_router_indices", ids[rows, row, :].astype(np.int32))
                if weights is not None:
                    cap.save(step, layer, "moe_router", weights[rows, row, :])
        cap.generated = generated[: steps - 1]
    return steps


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m moetrace_capture.routing", description=__doc__.split("\n\n")[0])
    parser.add_argument("config", help="the model's config.json")
    parser.add_argument("out", help="the capture folder to write")
    parser.add_argument("--prompt", required=True, help="prompt token ids, comma separated")
    parser.add_argument("--generated", default="", help="generated token ids, comma separated")
    parser.add_argument("--ids", required=True, help=".npy of expert ids [tokens, layers, top_k]")
    parser.add_argument("--prompt-ids", help=".npy of the prompt's expert ids (vLLM's prompt_routed_experts)")
    parser.add_argument("--weights", help=".npy of router weights, the shape of the ids")
    parser.add_argument("--backend", default="engine", help="the engine's name, for the manifest")
    args = parser.parse_args(argv)
    ids_of = lambda text: [int(t) for t in text.split(",") if t.strip()]  # noqa: E731
    try:
        with open(args.config, encoding="utf-8") as f:
            config = json.load(f)
        steps = write_routing_capture(
            args.out, config, ids_of(args.prompt), ids_of(args.generated), np.load(args.ids),
            prompt_ids=np.load(args.prompt_ids) if args.prompt_ids else None,
            weights=np.load(args.weights) if args.weights else None, backend=args.backend)
    except (CaptureError, OSError, ValueError, KeyError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"{args.out}: routing of {steps} steps")
    return 0


if __name__ == "__main__":
    sys.exit(main())
