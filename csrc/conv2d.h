// Direct 2-D convolution on channels-last (NHWC) float32 tensors, for the CPU: the eager models' small batch-1
// convolutions, where PyTorch's own call (im2col + GEMM, ~15-20 us of fixed cost a call on a 4x4 input) costs more
// than the arithmetic. The spec is torch.nn.functional.conv2d (groups 1, dilation 1, zero padding).
//
// out[b, oy, ox, o] = bias[o] + sum_{ky, kx, c} x[b, oy*sh - ph + ky, ox*sw - pw + kx, c] * w[o, c, ky, kx]
// (terms outside the input are zero). Summation order: bias first, then ky, kx, c ascending, one rounding per
// multiply-add (FMA) in the AVX-512 path and per multiply and add in the generic one; either way within float32
// rounding of the spec, not bitwise (PyTorch's GEMMs sum in their own blocked order).
//
// Layouts (all float32, contiguous as described): x [batch, height, width, in_channels]; out [batch, out_h, out_w,
// out_channels] with out_h = (height + 2 ph - kh) / sh + 1 and the same for the width; bias [out_channels] or none;
// the weight packed by the caller as [ceil(out_channels / 16), kh, kw, in_channels, 16] (output channel o at block
// o / 16, lane o % 16; lanes past out_channels zero).
// Pointers arrive as integers (Tensor.data_ptr()) so the module never links to torch.
#pragma once

#include <cstdint>
#include <string>

namespace blitzdiff {

// One convolution's geometry and its packed weight (the caller keeps it alive and unchanged while the object is
// used). Construction checks the geometry (std::invalid_argument, ValueError in Python).
class Conv2dNhwc {
 public:
  Conv2dNhwc(std::int64_t in_channels, std::int64_t out_channels, std::int64_t kernel_h, std::int64_t kernel_w,
             std::int64_t stride_h, std::int64_t stride_w, std::int64_t pad_h, std::int64_t pad_w,
             std::uintptr_t packed_weight);

  // out = conv(x) + bias for x [batch, height, width, in_channels] (bias 0: none); on up to `threads` threads.
  // generic: the portable loop even where the AVX-512 one could run (for tests). Throws std::invalid_argument for
  // bad sizes or pointers.
  void run(std::uintptr_t out, std::uintptr_t x, std::uintptr_t bias, std::int64_t batch, std::int64_t height,
           std::int64_t width, std::int64_t threads, bool generic) const;

  std::int64_t in_channels, out_channels, kernel_h, kernel_w, stride_h, stride_w, pad_h, pad_w;
  std::uintptr_t packed_weight;
};

// "avx512f" where this CPU runs the AVX-512 loop, else "generic".
std::string conv2d_nhwc_isa();

}  // namespace blitzdiff
