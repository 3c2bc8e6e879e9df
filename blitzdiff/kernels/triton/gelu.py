"""The tanh-approximate GELU in Triton: x / (1 + exp(-2z)), z = sqrt(2 / pi) (x + 0.044715 x^3), in float32,
one block of elements per program. exp overflows to inf for large -2z, giving x * 0 (NaN for -inf), as torch's
GELU. Imported only when the "triton" backend is asked for; blitzdiff.kernels.gelu checks the inputs.
"""

import torch
import triton
import triton.language as tl

BLOCK = 1024


@triton.jit
def _gelu_tanh(out_ptr, x_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    t = -1.5957691216057308 * (x + 0.044715 * x * x * x)  # -2z
    y = tl.div_rn(x, 1.0 + tl.exp(t))
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def gelu_tanh(out: torch.Tensor, x: torch.Tensor) -> None:
    """out = gelu_tanh(x) over the contiguous x and out (out may be x)."""
    n = x.numel()
    _gelu_tanh[(triton.cdiv(n, BLOCK),)](out, x, n, BLOCK=BLOCK)
