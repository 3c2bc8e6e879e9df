// CPU kernel of the Winograd F(2x2, 3x3) convolution; see conv2d_winograd.h for the contract.
//
// Work is split into chunks of output tiles (2x2 pixels each). Per chunk, on one thread: the input transform
// writes V[p, tile, c] (16 positions), the micro-kernel computes M[p, tile, o] = sum_c V[p, tile, c] U[p, c, o], and
// the output transform writes out = A^T M A + bias. A chunk's V and M stay under ~256 KiB, in the core's L2.
// Zero padding: a tile whose input patch reaches past the image has its patch copied, zeros included, first.
#include "conv2d_winograd.h"

#include <algorithm>
#include <memory>
#include <stdexcept>
#include <string>

#include "parallel.h"
#include "tile_kernel.h"

namespace blitzdiff {
namespace {

constexpr std::int64_t kPositions = 16;                              // a 4x4 transformed tile
constexpr std::int64_t kChunkFloats = std::int64_t{1} << 16;         // V + M of a chunk: 256 KiB
constexpr std::int64_t kMinMacsPerThread = std::int64_t{1} << 18;    // as the direct kernel

// The transforms of one tile, every channel, in the portable loop (scalar) and in AVX-512 (16 channels a vector,
// the last one masked); the same operations in the same order, so the same bits.
//   input:  V[p * pos_step + c] = (B^T d B)[p] with d[i][j] at patch[(i * row + j) * channels + c];
//   output: out[(i * row + j) * channels + o] = (A^T M A)[i][j] + bias[o] for i < rows, j < cols, with M[p] at
//           m[p * pos_step + o].
// B^T rows: d0 - d2, d1 + d2, d2 - d1, d1 - d3; A^T rows: m0 + m1 + m2, m1 - m2 - m3 (applied to rows, then columns).
void input_transform_generic(const float* patch, std::int64_t row, std::int64_t channels, float* v,
                             std::int64_t pos_step) {
  for (std::int64_t c = 0; c < channels; ++c) {
    float d[4][4], t[4][4];
    for (int i = 0; i < 4; ++i) {
      for (int j = 0; j < 4; ++j) d[i][j] = patch[(i * row + j) * channels + c];
    }
    for (int j = 0; j < 4; ++j) {
      t[0][j] = d[0][j] - d[2][j];
      t[1][j] = d[1][j] + d[2][j];
      t[2][j] = d[2][j] - d[1][j];
      t[3][j] = d[1][j] - d[3][j];
    }
    for (int i = 0; i < 4; ++i) {
      v[(i * 4 + 0) * pos_step + c] = t[i][0] - t[i][2];
      v[(i * 4 + 1) * pos_step + c] = t[i][1] + t[i][2];
      v[(i * 4 + 2) * pos_step + c] = t[i][2] - t[i][1];
      v[(i * 4 + 3) * pos_step + c] = t[i][1] - t[i][3];
    }
  }
}

void output_transform_generic(const float* m, std::int64_t pos_step, const float* bias, std::int64_t channels,
                              float* out, std::int64_t row, int rows, int cols) {
  for (std::int64_t o = 0; o < channels; ++o) {
    float s[2][4];
    for (int j = 0; j < 4; ++j) {
      s[0][j] = m[j * pos_step + o] + m[(4 + j) * pos_step + o] + m[(8 + j) * pos_step + o];
      s[1][j] = m[(4 + j) * pos_step + o] - m[(8 + j) * pos_step + o] - m[(12 + j) * pos_step + o];
    }
    const float b = bias == nullptr ? 0.0f : bias[o];
    for (int i = 0; i < rows; ++i) {
      out[i * row * channels + o] = (s[i][0] + s[i][1] + s[i][2]) + b;
      if (cols > 1) out[(i * row + 1) * channels + o] = (s[i][1] - s[i][2] - s[i][3]) + b;
    }
  }
}

#ifdef BLITZDIFF_HAVE_AVX512_TILE
__attribute__((target("avx512f"))) void input_transform_avx512(const float* patch, std::int64_t row,
                                                                std::int64_t channels, float* v,
                                                                std::int64_t pos_step) {
  for (std::int64_t c = 0; c < channels; c += kLanes) {
    const __mmask16 lanes = static_cast<__mmask16>(channels - c >= kLanes ? 0xFFFFu : (1u << (channels - c)) - 1u);
    __m512 d[4][4], t[4][4];
    for (int i = 0; i < 4; ++i) {
      for (int j = 0; j < 4; ++j) d[i][j] = _mm512_maskz_loadu_ps(lanes, patch + (i * row + j) * channels + c);
    }
    for (int j = 0; j < 4; ++j) {
      t[0][j] = _mm512_sub_ps(d[0][j], d[2][j]);
      t[1][j] = _mm512_add_ps(d[1][j], d[2][j]);
      t[2][j] = _mm512_sub_ps(d[2][j], d[1][j]);
      t[3][j] = _mm512_sub_ps(d[1][j], d[3][j]);
    }
    for (int i = 0; i < 4; ++i) {
      _mm512_mask_storeu_ps(v + (i * 4 + 0) * pos_step + c, lanes, _mm512_sub_ps(t[i][0], t[i][2]));
      _mm512_mask_storeu_ps(v + (i * 4 + 1) * pos_step + c, lanes, _mm512_add_ps(t[i][1], t[i][2]));
      _mm512_mask_storeu_ps(v + (i * 4 + 2) * pos_step + c, lanes, _mm512_sub_ps(t[i][2], t[i][1]));
      _mm512_mask_storeu_ps(v + (i * 4 + 3) * pos_step + c, lanes, _mm512_sub_ps(t[i][1], t[i][3]));
    }
  }
}

__attribute__((target("avx512f"))) void output_transform_avx512(const float* m, std::int64_t pos_step,
                                                                 const float* bias, std::int64_t channels, float* out,
                                                                 std::int64_t row, int rows, int cols) {
  for (std::int64_t o = 0; o < channels; o += kLanes) {
    const __mmask16 lanes = static_cast<__mmask16>(channels - o >= kLanes ? 0xFFFFu : (1u << (channels - o)) - 1u);
    __m512 s[2][4];
    for (int j = 0; j < 4; ++j) {
      const __m512 m0 = _mm512_maskz_loadu_ps(lanes, m + j * pos_step + o);
      const __m512 m1 = _mm512_maskz_loadu_ps(lanes, m + (4 + j) * pos_step + o);
      const __m512 m2 = _mm512_maskz_loadu_ps(lanes, m + (8 + j) * pos_step + o);
      const __m512 m3 = _mm512_maskz_loadu_ps(lanes, m + (12 + j) * pos_step + o);
      s[0][j] = _mm512_add_ps(_mm512_add_ps(m0, m1), m2);
      s[1][j] = _mm512_sub_ps(_mm512_sub_ps(m1, m2), m3);
    }
    const __m512 b = bias == nullptr ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(lanes, bias + o);
    for (int i = 0; i < rows; ++i) {
      const __m512 y0 = _mm512_add_ps(_mm512_add_ps(_mm512_add_ps(s[i][0], s[i][1]), s[i][2]), b);
      _mm512_mask_storeu_ps(out + i * row * channels + o, lanes, y0);
      if (cols > 1) {
        const __m512 y1 = _mm512_add_ps(_mm512_sub_ps(_mm512_sub_ps(s[i][1], s[i][2]), s[i][3]), b);
        _mm512_mask_storeu_ps(out + (i * row + 1) * channels + o, lanes, y1);
      }
    }
  }
}
#endif

void input_transform(const float* patch, std::int64_t row, std::int64_t channels, float* v, std::int64_t pos_step,
                     bool avx512) {
#ifdef BLITZDIFF_HAVE_AVX512_TILE
  if (avx512) return input_transform_avx512(patch, row, channels, v, pos_step);
#endif
  (void)avx512;
  input_transform_generic(patch, row, channels, v, pos_step);
}

void output_transform(const float* m, std::int64_t pos_step, const float* bias, std::int64_t channels, float* out,
                      std::int64_t row, int rows, int cols, bool avx512) {
#ifdef BLITZDIFF_HAVE_AVX512_TILE
  if (avx512) return output_transform_avx512(m, pos_step, bias, channels, out, row, rows, cols);
#endif
  (void)avx512;
  output_transform_generic(m, pos_step, bias, channels, out, row, rows, cols);
}

}  // namespace

Conv2dWinograd::Conv2dWinograd(std::int64_t in_channels_, std::int64_t out_channels_, std::int64_t pad_h_,
                               std::int64_t pad_w_, std::uintptr_t packed_weight_)
    : in_channels(in_channels_), out_channels(out_channels_), pad_h(pad_h_), pad_w(pad_w_),
      packed_weight(packed_weight_) {
  if (in_channels < 1 || out_channels < 1) {
    throw std::invalid_argument("conv2d_winograd: in_channels and out_channels must be >= 1, got " +
                                std::to_string(in_channels) + ", " + std::to_string(out_channels));
  }
  if (pad_h < 0 || pad_w < 0) {
    throw std::invalid_argument("conv2d_winograd: padding must be >= 0, got " + std::to_string(pad_h) + ", " +
                                std::to_string(pad_w));
  }
  if (packed_weight == 0) throw std::invalid_argument("conv2d_winograd: packed_weight must be a non-null pointer");
}

void Conv2dWinograd::run(std::uintptr_t out, std::uintptr_t x, std::uintptr_t bias, std::int64_t batch,
                         std::int64_t height, std::int64_t width, std::int64_t threads, bool generic) const {
  check_threads("conv2d_winograd", threads);
  if (batch < 0) throw std::invalid_argument("conv2d_winograd: batch must be >= 0, got " + std::to_string(batch));
  if (height < 1 || width < 1) {
    throw std::invalid_argument("conv2d_winograd: height and width must be >= 1, got " + std::to_string(height) +
                                ", " + std::to_string(width));
  }
  const std::int64_t out_h = height + 2 * pad_h - 2, out_w = width + 2 * pad_w - 2;
  if (out_h < 1 || out_w < 1) {
    throw std::invalid_argument("conv2d_winograd: the padded input (" + std::to_string(height + 2 * pad_h) + "x" +
                                std::to_string(width + 2 * pad_w) + ") is smaller than the 3x3 kernel");
  }
  if (batch == 0) return;
  if (out == 0 || x == 0) throw std::invalid_argument("conv2d_winograd: out and x must be non-null pointers");

  const std::int64_t cin = in_channels, cout = out_channels;
  const std::int64_t tiles_h = (out_h + 1) / 2, tiles_w = (out_w + 1) / 2;
  const auto* input = reinterpret_cast<const float*>(x);
  const std::int64_t tiles = batch * tiles_h * tiles_w;
  // a multiple of the micro-kernel's rows, small enough for L2 and for every thread to get one; a tile's result does
  // not depend on its chunk, so neither do the bits
  const std::int64_t l2_chunk = kChunkFloats / (kPositions * (cin + cout)) / kTilePixels * kTilePixels;
  const std::int64_t per_thread = (tiles + threads - 1) / threads;
  const std::int64_t chunk = std::max<std::int64_t>(
      kTilePixels, std::min(l2_chunk, (per_thread + kTilePixels - 1) / kTilePixels * kTilePixels));
  const std::int64_t chunks = (tiles + chunk - 1) / chunk;
  const std::int64_t blocks = (cout + kLanes - 1) / kLanes;
  const std::int64_t macs_per_chunk = kPositions * chunk * cin * cout;
  const bool avx512 = !generic && cpu_has_avx512();
  const auto* weight = reinterpret_cast<const float*>(packed_weight);
  const auto* bias_values = reinterpret_cast<const float*>(bias);
  auto* output = reinterpret_cast<float*>(out);

  Tile base{};
  base.pixel_step = cin;  // a row of the product: one tile's transformed channels
  base.row_step = 0;
  base.block_step = cin * kLanes;
  base.out_step = cout;
  base.in_channels = cin;
  base.kernel_h = base.kernel_w = 1;

  parallel_ranges(chunks, std::max<std::int64_t>(1, kMinMacsPerThread / macs_per_chunk), threads,
                  [&](std::int64_t first, std::int64_t last) {
    // per thread, not zeroed: every element read is written first
    std::unique_ptr<float[]> v(new float[static_cast<std::size_t>(kPositions * chunk * cin)]);
    std::unique_ptr<float[]> m(new float[static_cast<std::size_t>(kPositions * chunk * cout)]);
    std::unique_ptr<float[]> edge(new float[static_cast<std::size_t>(kPositions * cin)]);
    for (std::int64_t index = first; index < last; ++index) {
      const std::int64_t tile0 = index * chunk, count = std::min(chunk, tiles - tile0);
      for (std::int64_t k = 0; k < count; ++k) {
        const std::int64_t tile = tile0 + k, tx = tile % tiles_w, ty = (tile / tiles_w) % tiles_h;
        const float* image = input + tile / (tiles_w * tiles_h) * height * width * cin;
        // the tile's 4x4 input patch starts at (top, left); inside the image it is read in place, else copied with
        // the zero padding into `edge`
        const std::int64_t top = 2 * ty - pad_h, left = 2 * tx - pad_w;
        if (top >= 0 && left >= 0 && top + 4 <= height && left + 4 <= width) {
          input_transform(image + (top * width + left) * cin, width, cin, v.get() + k * cin, chunk * cin, avx512);
          continue;
        }
        for (std::int64_t i = 0; i < 4; ++i) {
          for (std::int64_t j = 0; j < 4; ++j) {
            float* to = edge.get() + (i * 4 + j) * cin;
            const std::int64_t y = top + i, xx = left + j;
            if (y >= 0 && y < height && xx >= 0 && xx < width) {
              std::copy(image + (y * width + xx) * cin, image + (y * width + xx + 1) * cin, to);
            } else {
              std::fill(to, to + cin, 0.0f);
            }
          }
        }
        input_transform(edge.get(), 4, cin, v.get() + k * cin, chunk * cin, avx512);
      }
      for (std::int64_t p = 0; p < kPositions; ++p) {
        for (std::int64_t row = 0; row < count; row += kTilePixels) {
          for (std::int64_t block = 0; block < blocks; block += kTileBlocks) {
            const int tile_blocks = static_cast<int>(std::min<std::int64_t>(kTileBlocks, blocks - block));
            Tile t = base;
            t.x = v.get() + (p * chunk + row) * cin;
            t.w = weight + (p * blocks + block) * cin * kLanes;
            t.bias = nullptr;
            t.out = m.get() + (p * chunk + row) * cout + block * kLanes;
            t.last_lanes = static_cast<int>(std::min<std::int64_t>(kLanes, cout - (block + tile_blocks - 1) * kLanes));
            run_tile(t, static_cast<int>(std::min<std::int64_t>(kTilePixels, count - row)), tile_blocks, avx512);
          }
        }
      }
      for (std::int64_t k = 0; k < count; ++k) {
        const std::int64_t tile = tile0 + k, tx = tile % tiles_w, ty = (tile / tiles_w) % tiles_h;
        const std::int64_t b = tile / (tiles_w * tiles_h);
        output_transform(m.get() + k * cout, chunk * cout, bias_values, cout,
                         output + ((b * out_h + 2 * ty) * out_w + 2 * tx) * cout, out_w,
                         static_cast<int>(std::min<std::int64_t>(2, out_h - 2 * ty)),
                         static_cast<int>(std::min<std::int64_t>(2, out_w - 2 * tx)), avx512);
      }
    }
  });
}

}  // namespace blitzdiff
