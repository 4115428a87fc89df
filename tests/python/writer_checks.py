"""Bad input to moetrace_capture.Capture: each call is refused with a
message that names it, nothing half-written is left, and non-finite values
are recorded, not refused. Exits non-zero on the first failed check."""
import atexit
import os
import shutil
import sys
import tempfile

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "..", "python"))
from moetrace_capture import Capture, CaptureError  # noqa: E402

root = tempfile.mkdtemp(prefix="moetrace-py-")
atexit.register(shutil.rmtree, root, True)
config = {"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 4}


def refused(call, *words):
    try:
        call()
    except CaptureError as e:
        for w in words:
            assert w in str(e), f"message {str(e)!r} lacks {w!r}"
        return
    raise AssertionError(f"not refused: {words}")


out = os.path.join(root, "cap")
cap = Capture(out, config=config, prompt=[1, 2])
cap.begin_step(0, 0, [1, 2])
refused(lambda: cap.save(0, 0, "attn_nrom", np.zeros((2, 4))), "attn_nrom", "valid stages", "attn_norm")
refused(lambda: cap.save(0, None, "attn_norm", np.zeros((2, 4))), "layer stage")
refused(lambda: cap.save(0, 1, "lm_head", np.zeros((2, 9))), "model stage")
refused(lambda: cap.save(1, 0, "attn_norm", np.zeros((2, 4))), "begin_step(1")
refused(lambda: cap.save(0, 0, "attn_norm", np.zeros((3, 4))), "dimension 0 (T)", "T = 2")
refused(lambda: cap.save(0, 0, "moe_router_indices", np.zeros((2, 2))), "integer")
refused(lambda: cap.save(0, -1, "attn_norm", np.zeros((2, 4))), "layer", "-1")
cap.save(0, 0, "attn_norm", np.array([[np.nan, np.inf, -np.inf, 1.0]] * 2, dtype=np.float32))
refused(lambda: cap.save(0, 0, "attn_norm", np.zeros((2, 4))), "already saved")
cap.begin_step(1, 2, [5])
refused(lambda: cap.save(1, 0, "attn_norm", np.zeros((1, 5))), "disagrees with step 0", "dimension 1 (H)")
cap.save(1, 0, "attn_norm", np.zeros((1, 4), dtype=np.float64))
cap.close()
kept = np.load(os.path.join(out, "step-0", "layer-0", "attn_norm.npy"))
assert np.isnan(kept[0, 0]) and np.isposinf(kept[0, 1]) and np.isneginf(kept[0, 2]), kept
# A failed capture leaves nothing; a folder that is not a capture is not replaced.
failed = os.path.join(root, "failed")
try:
    with Capture(failed, config=config, prompt=[1]) as c:
        c.begin_step(0, 0, [1])
        c.save(0, 0, "attn_norm", np.zeros((1, 4)))
        raise RuntimeError("the engine crashed")
except RuntimeError:
    pass
assert not os.path.exists(failed) and not [e for e in os.listdir(root) if "moetrace-tmp" in e], os.listdir(root)
mine = os.path.join(root, "mine")
os.makedirs(mine)
open(os.path.join(mine, "notes.txt"), "w").write("keep me")
refused(lambda: Capture(mine, config=config, prompt=[1]), "not a moetrace capture")
print("writer checks passed")
