"""moetrace_capture: write moetrace captures from Python (numpy arrays or
PyTorch tensors), so `moetrace diff` compares any implementation with
moetrace's runs stage by stage. numpy is the only dependency.

    from moetrace_capture import Capture
    with Capture("my-capture", config=config_dict, prompt=ids, backend="mine") as cap:
        cap.begin_step(0, start_position=0, tokens=ids)
        cap.save(0, 0, "moe_router_logits", logits)   # step, layer, stage, tensor
"""

from .stages import STAGES
from .writer import FORMAT, Capture, CaptureError, stage_names

__all__ = ["Capture", "CaptureError", "FORMAT", "STAGES", "stage_names"]
__version__ = "0.1.0"
