"""Reads a moetrace capture with numpy and writes it again through the
moetrace_capture package (as an engine's own hooks would), optionally with
one value set to NaN. Usage: recapture.py SOURCE OUT [STEP LAYER STAGE]."""
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "python"))
from moetrace_capture import Capture  # noqa: E402

source, out = sys.argv[1], sys.argv[2]
poison = (int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]) if len(sys.argv) > 5 else None
manifest = json.load(open(os.path.join(source, "manifest.json"), encoding="utf-8"))
with Capture(out, config=manifest["model"]["config"], prompt=manifest["prompt"], backend="python", dtype="float32") as cap:
    for s in manifest["steps"]:
        cap.begin_step(s["step"], s["start_position"], s["tokens"])
    for t in manifest["tensors"]:
        array = np.load(os.path.join(source, t["path"]))
        if poison and (t["step"], t["layer"], t["stage"]) == poison:
            array = array.copy()
            array.flat[0] = np.nan
        cap.save(t["step"], t["layer"], t["stage"], array)
    cap.generated = manifest["generated"]
print(f"wrote {len(manifest['tensors'])} tensors to {out}")
