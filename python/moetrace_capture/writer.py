"""`Capture`: writes a moetrace capture folder (format moetrace-capture/1)
from numpy arrays or PyTorch tensors, so that `moetrace diff` compares any
Python implementation with moetrace's runs stage by stage.

The folder holds step-<s>/[layer-<l>/]<stage>.npy and manifest.json, the
layout moetrace writes. Tensors go into a temporary sibling folder that is
renamed into place by `close()`; a failed or abandoned capture leaves
nothing behind.
"""

import json
import os
import re
import shutil

import numpy as np

from .stages import STAGES

FORMAT = "moetrace-capture/1"

_BY_NAME = {name: (scope, applies, shape, element) for name, scope, applies, shape, element in STAGES}
_ALIASES = {"layer_output": "post_ffn_residual"}
# What .npy element types moetrace reads; others are converted.
_KEPT = {np.dtype("float32"), np.dtype("float64"), np.dtype("int32"), np.dtype("int64")}


class CaptureError(ValueError):
    """A capture call with bad input; the message names it and what is valid."""


def stage_names():
    """Every stage name, in execution order."""
    return [s[0] for s in STAGES]


def _dims(shape):
    """The symbols of a stage's shape, e.g. '[nh,T,P]' -> ['nh', 'T', 'P']."""
    return [d.strip() for d in shape.strip("[]").split(",")]


def _to_numpy(tensor):
    """numpy array of a numpy array, a PyTorch tensor (any device, bf16 and
    f16 widened to f32) or anything np.asarray takes."""
    if hasattr(tensor, "detach") and hasattr(tensor, "cpu"):
        t = tensor.detach().cpu()
        if str(t.dtype) in ("torch.bfloat16", "torch.float16"):
            t = t.float()
        tensor = t.numpy()
    array = np.asarray(tensor)
    if array.dtype in _KEPT:
        return array
    if array.dtype.kind == "f":
        return array.astype(np.float32)
    if array.dtype.kind in "iu" and array.dtype.itemsize <= 8:
        return array.astype(np.int64)
    raise CaptureError(f"tensors of {array.dtype} cannot be captured (float or integer arrays only)")


class Capture:
    """A capture being written to `out_dir`.

    config: the model's config.json as a dict (moetrace diff refuses to
    compare captures of different configs or prompts unless --force).
    prompt: the prompt's token ids. backend and dtype describe the run
    (e.g. "hf", "float64"). `out_dir` must not exist, be empty, or be a
    moetrace capture (which is replaced when `close()` succeeds).

    Use as a context manager, or call `close()`:

        with Capture("hf-capture", config=cfg, prompt=ids, backend="hf") as cap:
            cap.begin_step(0, start_position=0, tokens=ids)
            cap.save(0, 0, "attn_norm", hidden)          # layer stage
            cap.save(0, None, "lm_head", logits)         # model stage
            cap.generated = [next_id]
    """

    def __init__(self, out_dir, *, config, prompt, backend="python", dtype="float32", source=None, producer=None):
        self.out_dir = os.path.abspath(os.fspath(out_dir))
        _check_replaceable(self.out_dir)
        if not isinstance(config, dict):
            raise CaptureError("config must be the model's config.json as a dict")
        self.config = config
        self.prompt = [int(t) for t in prompt]
        self.backend = str(backend)
        self.dtype = str(dtype)
        self.source = source
        self.producer = producer or "moetrace_capture (python)"
        self.generated = []
        self._steps = {}
        self._tensors = []
        self._seen = set()
        # (layer, stage) -> (step, shape) of its first save, for the checks.
        self._first_shape = {}
        parent, name = os.path.split(self.out_dir)
        os.makedirs(parent, exist_ok=True)
        self._tmp = os.path.join(parent, f".{name}.moetrace-tmp-{os.getpid()}-py")
        if os.path.exists(self._tmp):
            shutil.rmtree(self._tmp)
        os.makedirs(self._tmp)
        self._closed = False

    def __enter__(self):
        return self

    def __exit__(self, kind, value, traceback):
        if kind is None:
            self.close()
        else:
            self.abandon()
        return False

    def begin_step(self, step, start_position, tokens):
        """Declares step `step`: the tokens fed and the position of the first."""
        step = _index(step, "step")
        if step in self._steps:
            raise CaptureError(f"step {step} was already begun")
        tokens = [int(t) for t in tokens]
        if not tokens:
            raise CaptureError(f"step {step} feeds no tokens")
        self._steps[step] = {"step": step, "start_position": _index(start_position, "start_position"), "tokens": tokens}

    def save(self, step, layer, stage, tensor):
        """Writes one stage's tensor. `layer` is the layer index for layer
        stages and None for embedding, final_norm and lm_head. Shapes are
        checked against the stage table (T = the step's token count, P =
        the positions seen, other sizes equal to earlier steps'); values
        are written as they are, NaN and infinities included."""
        self._check_open()
        step = _index(step, "step")
        if step not in self._steps:
            raise CaptureError(f"step {step} has not been begun: call begin_step({step}, start_position, tokens) first")
        stage = _ALIASES.get(stage, stage)
        if stage not in _BY_NAME:
            raise CaptureError(f"unknown stage `{stage}`; valid stages: {', '.join(stage_names())}")
        scope, _, shape_spec, element = _BY_NAME[stage]
        if scope == "layer":
            if layer is None:
                raise CaptureError(f"`{stage}` is a layer stage: give its layer index")
            layer = _index(layer, "layer")
        elif layer is not None:
            raise CaptureError(f"`{stage}` is a model stage (once per step): layer must be None, not {layer!r}")
        key = (step, layer, stage)
        if key in self._seen:
            raise CaptureError(f"step {step} layer {layer} `{stage}` was already saved")
        array = _to_numpy(tensor)
        if element == "int32" and array.dtype.kind != "i":
            raise CaptureError(f"`{stage}` holds expert ids: give an integer array, not {array.dtype}")
        self._check_shape(step, layer, stage, shape_spec, array.shape)
        rel = f"step-{step}/layer-{layer}/{stage}.npy" if layer is not None else f"step-{step}/{stage}.npy"
        path = os.path.join(self._tmp, *rel.split("/"))
        os.makedirs(os.path.dirname(path), exist_ok=True)
        little = array.astype(array.dtype.newbyteorder("<"), copy=False)
        np.save(path, np.ascontiguousarray(little), allow_pickle=False)
        self._seen.add(key)
        self._first_shape.setdefault((layer, stage), (step, array.shape))
        self._tensors.append(
            {"path": rel, "stage": stage, "layer": layer, "step": step, "shape": list(array.shape), "dtype": str(little.dtype)}
        )

    def _check_shape(self, step, layer, stage, spec, shape):
        dims = _dims(spec)
        if len(shape) != len(dims):
            raise CaptureError(f"step {step} layer {layer} `{stage}`: shape {tuple(shape)} has rank {len(shape)}, the stage is {spec}")
        s = self._steps[step]
        sizes = {"T": len(s["tokens"]), "P": s["start_position"] + len(s["tokens"])}
        for i, (d, n) in enumerate(zip(dims, shape)):
            if d in sizes and n != sizes[d]:
                raise CaptureError(
                    f"step {step} layer {layer} `{stage}`: dimension {i} ({d}) is {n}, but step {step} has {d} = {sizes[d]} "
                    f"(T: tokens fed, P: start_position + T)"
                )
        earlier = self._first_shape.get((layer, stage))
        if earlier is None:
            return
        other_step, other = earlier
        for i, d in enumerate(dims):
            if d not in ("T", "P") and other[i] != shape[i]:
                raise CaptureError(
                    f"step {step} layer {layer} `{stage}`: shape {tuple(shape)} disagrees with step {other_step}'s "
                    f"{tuple(other)} in dimension {i} ({d})"
                )

    def close(self):
        """Writes manifest.json and moves the capture into place."""
        self._check_open()
        config = self.config
        manifest = {
            "format": FORMAT,
            "producer": self.producer,
            "backend": self.backend,
            "dtype": self.dtype,
            "model": {
                "architecture": (config.get("architectures") or ["unknown"])[0],
                "config": config,
                **({"source": self.source} if self.source else {}),
            },
            "prompt": self.prompt,
            "generated": [int(t) for t in self.generated],
            "steps": [self._steps[s] for s in sorted(self._steps)],
            "tensors": self._tensors,
        }
        with open(os.path.join(self._tmp, "manifest.json"), "w", encoding="utf-8") as f:
            json.dump(manifest, f, indent=2)
            f.write("\n")
        old = None
        if os.path.lexists(self.out_dir):
            _check_replaceable(self.out_dir)
            old = self.out_dir + f".moetrace-old-{os.getpid()}"
            os.rename(self.out_dir, old)
        os.rename(self._tmp, self.out_dir)
        if old:
            shutil.rmtree(old)
        self._closed = True

    def abandon(self):
        """Removes what was written; out_dir is left as it was."""
        if not self._closed:
            shutil.rmtree(self._tmp, ignore_errors=True)
            self._closed = True

    def _check_open(self):
        if self._closed:
            raise CaptureError("this capture is closed")


def _index(value, what):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise CaptureError(f"{what} must be a whole number >= 0, not {value!r}")
    return int(value)


def _check_replaceable(path):
    """out_dir may be absent, an empty folder or a moetrace capture."""
    if os.path.islink(path):
        raise CaptureError(f"{path} is a symbolic link; give the folder itself")
    if not os.path.exists(path):
        return
    if not os.path.isdir(path):
        raise CaptureError(f"{path} exists and is not a folder")
    entries = os.listdir(path)
    if not entries:
        return
    manifest = os.path.join(path, "manifest.json")
    try:
        with open(manifest, encoding="utf-8") as f:
            is_capture = json.load(f).get("format") == FORMAT
    except (OSError, ValueError):
        is_capture = False
    step_dir = re.compile(r"^step-\d+$")
    if not is_capture or any(e != "manifest.json" and not step_dir.match(e) for e in entries):
        raise CaptureError(f"{path} holds files that are not a moetrace capture; refusing to replace it")
