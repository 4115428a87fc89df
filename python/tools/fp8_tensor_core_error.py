"""What Hopper's FP8 tensor cores would change in an FP8 projection
(issue 24): they multiply e4m3 by e4m3, so the activations must be
quantized too, as DeepSeek's inference does (`act_quant`: per token, per
128 columns, scale = amax / 448). moetrace's CUDA backend instead decodes
the FP8 weights to f32 (F32) or bf16 (Bf16) and multiplies bf16/f32
activations with f32 sums, the values the reference defines. This prints,
for DeepSeek-V3's hidden width, how far each path is from the exact
product with the same FP8 weights: the activation quantization against
the Bf16 backend's own output rounding.

Usage: python fp8_tensor_core_error.py   (needs torch)
"""
import torch

torch.manual_seed(0)
k, n, t, block = 7168, 512, 64, 128
w = torch.randn(n, k) / k**0.5


def blocks_e4m3(m, rows, cols):
    """m with each rows x cols block scaled to e4m3's range and rounded."""
    q = torch.empty_like(m)
    for i in range(0, m.shape[0], rows):
        for j in range(0, m.shape[1], cols):
            b = m[i:i + rows, j:j + cols]
            s = b.abs().amax(dim=1, keepdim=True).amax(dim=0, keepdim=True) / 448 if rows > 1 \
                else b.abs().amax(dim=1, keepdim=True) / 448
            q[i:i + rows, j:j + cols] = (b / s).to(torch.float8_e4m3fn).to(torch.float32) * s
    return q


wq = blocks_e4m3(w, block, block)
x = torch.randn(t, k).to(torch.bfloat16).to(torch.float32)
exact = x.double() @ wq.double().T
tensor_cores = blocks_e4m3(x, 1, block).double() @ wq.double().T
bf16_output = exact.to(torch.bfloat16).double()


def rel(a, b):
    return (a - b).norm(dim=1) / b.norm(dim=1)


print(f"FP8 tensor cores (activations quantized per 1x{block}): rel_l2 per row "
      f"median {rel(tensor_cores, exact).median():.3e}, max {rel(tensor_cores, exact).max():.3e}")
print(f"moetrace Bf16 (output rounded to bf16): rel_l2 per row median {rel(bf16_output, exact).median():.3e}")
