// Winograd F(2x2, 3x3) and F(4x4, 3x3) convolutions on channels-last (NHWC) float32 tensors, for the CPU: 3x3,
// stride-1 convolutions (the bulk of a UNet's arithmetic) with (m + 2)^2 multiply-adds per m x m output tile and
// channel pair instead of 9 m^2: 2.25x fewer than a direct or GEMM convolution for m = 2, 4x fewer for m = 4, paid
// for by additions in the transforms and, for m = 4, larger rounding errors (Lavin & Gray, "Fast Algorithms for
// Convolutional Neural Networks", 2015). The spec is torch.nn.functional.conv2d (3x3 kernel, stride 1, dilation 1,
// groups 1, zero padding); results agree with it within float32 rounding of the Winograd computation, not bitwise.
//
// With d an (m + 2) x (m + 2) input patch, g a 3x3 kernel, the m x m output tile is
//   A^T [ sum_c (G g_oc G^T) .* (B^T d_c B) ] A + bias[o],
// for m = 2:
//   B^T = [[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
//   G   = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]],
//   A^T = [[1, 1, 1, 0], [0, 1, -1, -1]];
// for m = 4:
//   B^T = [[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0], [0, -2, -1, 2, 1, 0],
//          [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
//   G   = [[1/4, 0, 0], [-1/6, -1/6, -1/6], [-1/6, 1/6, -1/6], [1/24, 1/12, 1/6], [1/24, -1/12, 1/6], [0, 0, 1]],
//   A^T = [[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]].
// The caller transforms the weight once (U = G g G^T, in float64, models.conv.pack_winograd) and packs it as
// [(m + 2)^2 positions, ceil(out_channels / 16), in_channels, 16] (position p = (m + 2) i + j; output channel o at
// block o / 16, lane o % 16; lanes past out_channels zero). Per chunk of tiles, the kernel transforms the input
// patches, runs the (m + 2)^2 products [tiles, in] x [in, out] with tile_kernel.h's micro-kernel and transforms them
// back. Layouts: x [batch, height, width, in_channels], out [batch, height + 2 ph - 2, width + 2 pw - 2,
// out_channels].
#pragma once

#include <cstdint>

namespace blitzdiff {

class Conv2dWinograd {
 public:
  // Output tiles of tile x tile pixels (2 or 4). Checks the geometry (std::invalid_argument, ValueError in
  // Python); the caller keeps the packed weight alive.
  Conv2dWinograd(std::int64_t in_channels, std::int64_t out_channels, std::int64_t pad_h, std::int64_t pad_w,
                 std::uintptr_t packed_weight, std::int64_t tile);

  // out = conv3x3(x) + bias (bias 0: none) for x [batch, height, width, in_channels], on up to `threads` threads;
  // generic: the portable GEMM loop even where the AVX-512 one could run (for tests).
  void run(std::uintptr_t out, std::uintptr_t x, std::uintptr_t bias, std::int64_t batch, std::int64_t height,
           std::int64_t width, std::int64_t threads, bool generic) const;

  std::int64_t in_channels, out_channels, pad_h, pad_w;
  std::uintptr_t packed_weight;
  std::int64_t tile;
};

}  // namespace blitzdiff
