"""A GGUF's every tensor decoded to F32 by gguf-py (llama.cpp's own Python
package: `gguf.quants.dequantize`, llama.cpp's formulas), written as a GGUF
with the same metadata, names and shapes: the twin whose values a decoder
of the quantized file must reproduce. moetrace's decoders are checked
against it (tests/gguf_deepseek2_quant.rs) without using them to make it.

Usage: dequantize_gguf.py IN.gguf OUT.gguf      (needs numpy and gguf)
"""
import sys

import gguf
import numpy as np
from gguf.quants import dequantize

src, dst = sys.argv[1], sys.argv[2]
reader = gguf.GGUFReader(src)
arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
writer = gguf.GGUFWriter(dst, arch=arch)
for field in reader.fields.values():
    if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
        continue
    value_type = field.types[0]
    sub_type = field.types[-1] if value_type == gguf.GGUFValueType.ARRAY else None
    if field.name == gguf.Keys.General.FILE_TYPE:
        writer.add_key_value(field.name, 0, value_type)  # ALL_F32
        continue
    writer.add_key_value(field.name, field.contents(), value_type, sub_type=sub_type)
for t in reader.tensors:
    values = dequantize(t.data, t.tensor_type).astype(np.float32)
    # GGUF lists dims innermost first; numpy wants them outermost first.
    shape = tuple(int(d) for d in reversed(t.shape))
    writer.add_tensor(t.name, values.reshape(shape), raw_dtype=gguf.GGMLQuantizationType.F32)
writer.write_header_to_file()
writer.write_kv_data_to_file()
writer.write_tensors_to_file()
writer.close()
print(f"{dst}: {len(reader.tensors)} tensors decoded to F32")
