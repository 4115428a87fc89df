"""Reading ggml tensors inside llama.cpp's eval callback (`cb_eval`),
through ggml's own API: each tensor's name, operation, sources, shape and
strides from `struct ggml_tensor`, its values through
`ggml_backend_tensor_get` (which copies from whichever backend holds them:
CPU, CUDA, ...).

The struct layout is ggml's (ggml/include/ggml.h) as llama-cpp-python
0.3.x vendors it; `check_layout` compares it with what ggml's own
functions say of a live tensor, so another layout is refused with a
message, never read wrongly.
"""

import ctypes

import numpy as np

GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64

# ggml_type values whose elements are read here; block-quantized types are not.
_DTYPES = {0: np.float32, 1: np.float16, 26: np.int32, 30: "bfloat16"}


class GgmlTensor(ctypes.Structure):
    """`struct ggml_tensor`."""


GgmlTensor._fields_ = [
    ("type", ctypes.c_int),
    ("buffer", ctypes.c_void_p),
    ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
    ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
    ("op", ctypes.c_int),
    ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
    ("flags", ctypes.c_int32),
    ("src", ctypes.POINTER(GgmlTensor) * GGML_MAX_SRC),
    ("view_src", ctypes.POINTER(GgmlTensor)),
    ("view_offs", ctypes.c_size_t),
    ("data", ctypes.c_void_p),
    ("name", ctypes.c_char * GGML_MAX_NAME),
    ("extra", ctypes.c_void_p),
    ("padding", ctypes.c_char * 8),
]


class GgmlLayoutError(RuntimeError):
    """This llama.cpp build's `struct ggml_tensor` is not the layout read here."""


class Ggml:
    """ggml's functions, from the library llama-cpp-python loaded."""

    def __init__(self, lib):
        self.lib = lib
        tensor_p = ctypes.POINTER(GgmlTensor)
        for name, args, result in (
            ("ggml_get_name", [tensor_p], ctypes.c_char_p),
            ("ggml_nbytes", [tensor_p], ctypes.c_size_t),
            ("ggml_nelements", [tensor_p], ctypes.c_int64),
            ("ggml_op_name", [ctypes.c_int], ctypes.c_char_p),
            ("ggml_type_name", [ctypes.c_int], ctypes.c_char_p),
            ("ggml_backend_tensor_get", [tensor_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t], None),
        ):
            fn = getattr(lib, name)
            fn.argtypes, fn.restype = args, result
        self._checked = False

    @staticmethod
    def tensor(pointer):
        """The tensor a callback's `struct ggml_tensor *` points at."""
        return ctypes.cast(pointer, ctypes.POINTER(GgmlTensor))

    def check_layout(self, t):
        """Refuses a build whose struct differs from `GgmlTensor`: the name
        and element count read from the struct must be ggml's."""
        if self._checked:
            return
        name = t.contents.name.decode("utf-8", "replace")
        ggml_name = (self.lib.ggml_get_name(t) or b"").decode("utf-8", "replace")
        count = int(np.prod([t.contents.ne[i] for i in range(GGML_MAX_DIMS)]))
        if name != ggml_name or count != self.lib.ggml_nelements(t):
            raise GgmlLayoutError(
                "this llama.cpp build's struct ggml_tensor is not the layout moetrace_capture reads "
                f"(name {name!r} vs ggml's {ggml_name!r}, {count} elements vs ggml's {self.lib.ggml_nelements(t)}); "
                "use llama-cpp-python 0.3.x"
            )
        self._checked = True

    def name(self, t):
        """The tensor's name (llama.cpp's `<stage>-<layer>`)."""
        return t.contents.name.decode("utf-8", "replace")

    def op(self, t):
        """The operation that computes it, e.g. `MUL_MAT`, `ROPE`."""
        return self.lib.ggml_op_name(t.contents.op).decode()

    def type_name(self, t):
        """Its element type, e.g. `f32`."""
        return self.lib.ggml_type_name(t.contents.type).decode()

    def sources(self, t):
        """Its inputs, in order."""
        return [s for s in t.contents.src if s]

    def read(self, t):
        """Its values as a numpy array of shape (ne3, ne2, ne1, ne0), strided
        as the tensor is (views included); None for a block-quantized type."""
        c = t.contents
        dtype = _DTYPES.get(c.type)
        if dtype is None:
            return None
        nbytes = self.lib.ggml_nbytes(t)
        raw = np.empty(nbytes, dtype=np.uint8)
        self.lib.ggml_backend_tensor_get(t, raw.ctypes.data_as(ctypes.c_void_p), 0, nbytes)
        shape = tuple(c.ne[i] for i in reversed(range(GGML_MAX_DIMS)))
        strides = tuple(c.nb[i] for i in reversed(range(GGML_MAX_DIMS)))
        element = np.uint16 if dtype == "bfloat16" else dtype
        if nbytes % np.dtype(element).itemsize:
            raise GgmlLayoutError(f"{self.name(t)}: {nbytes} bytes is not a whole number of {np.dtype(element)} elements")
        values = np.array(np.lib.stride_tricks.as_strided(raw.view(element), shape, strides))
        if dtype == "bfloat16":
            return (values.astype(np.uint32) << 16).view(np.float32)
        return values
