// A register-tiled small-GEMM micro-kernel shared by the CPU kernels that are matrix products over short inner
// dimensions (csrc/conv2d_cpu.cpp: a direct convolution; csrc/attention_cpu.cpp: q k^T and p v):
//
//   out[r * out_step + n] = (bias[n] + sum over the window (ky, kx) and c of
//       x[r * pixel_step + ky * row_step + kx * in_channels + c] * w[((ky * kw + kx) * in_channels + c) * 16 + n])
//       * row_scale[r]   (where row_scale is given)
//
// for up to kTilePixels rows r and up to kTileBlocks blocks of 16 columns n (block v's weights at w + v * block_step).
// A tile's accumulators stay in registers (8 x 2 zmm) while the loop runs over the window and c: per c it loads the
// weight vectors once and broadcasts each row's x value into one FMA per block. Each output is summed in one chain,
// bias first, then ky, kx, c ascending: one rounding per multiply-add in the AVX-512 loop, per multiply and per add in
// the portable one.
#pragma once

#include <algorithm>
#include <cstdint>

#include "vectorize.h"  // cpu_has_avx512

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
#include <immintrin.h>
#define BLITZDIFF_HAVE_AVX512_TILE 1
#endif

namespace blitzdiff {

constexpr int kLanes = 16;       // columns per block (one zmm of float32)
constexpr int kTilePixels = 8;   // rows per tile (R)
constexpr int kTileBlocks = 2;   // blocks per tile (NV): 8 x 2 accumulators + 2 weights + 1 broadcast

// What a tile needs to find its input, weights and output (pointers already offset to the tile's first pixel, its
// first channel block and its window's top-left input element).
struct Tile {
  const float* x;         // input element (window top-left, channel 0) of the tile's first pixel
  const float* w;         // packed weight of the tile's first block
  const float* bias;      // bias of the tile's first block's first channel, or null
  const float* row_scale;  // per row of the tile, a factor of its outputs (attention's 1 / softmax sum), or null
  float* out;             // output element (channel of the first block) of the tile's first pixel
  std::int64_t pixel_step;  // input floats between consecutive output pixels (stride_w * in_channels)
  std::int64_t row_step;    // input floats between image rows
  std::int64_t block_step;  // packed-weight floats between channel blocks (kh * kw * in_channels * 16)
  std::int64_t out_step;    // output floats between pixels (out_channels)
  std::int64_t in_channels;
  int kernel_h, kernel_w;
  int last_lanes;           // valid lanes of the tile's last block (16 unless out_channels % 16)
};

#ifdef BLITZDIFF_HAVE_AVX512_TILE
// NV blocks of accumulators, each a zmm, except the last in a ymm where Half (its valid lanes <= 8: an attention head
// of 24 values, the second block half used): on CPUs that split 512-bit operations in two (AMD Zen 4) a ymm FMA costs
// half a zmm one, the same bits (each lane its own FMA chain).
template <int R, int NV, bool Half>
__attribute__((target("avx512f,fma"))) inline void tile_avx512(const Tile& t) {
  constexpr int NZ = Half ? NV - 1 : NV;  // zmm blocks
  const __mmask16 last = static_cast<__mmask16>((1u << t.last_lanes) - 1u);
  // the ymm block's lanes: all ones below last_lanes (_mm256_maskstore_ps, AVX: no AVX512VL needed)
  const __m256i half_lanes = _mm256_cmpgt_epi32(_mm256_set1_epi32(t.last_lanes), _mm256_setr_epi32(0, 1, 2, 3, 4, 5,
                                                                                                     6, 7));
  __m512 start[NZ > 0 ? NZ : 1];
  __m256 half_start = _mm256_setzero_ps();
#pragma GCC unroll 2
  for (int v = 0; v < NZ; ++v) {
    const __mmask16 lanes = v == NV - 1 ? last : static_cast<__mmask16>(0xFFFF);
    start[v] = t.bias == nullptr ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(lanes, t.bias + v * kLanes);
  }
  if constexpr (Half) {
    if (t.bias != nullptr) half_start = _mm256_maskload_ps(t.bias + NZ * kLanes, half_lanes);
  }
  __m512 acc[R][NZ > 0 ? NZ : 1];
  __m256 half[R];
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
#pragma GCC unroll 2
    for (int v = 0; v < NZ; ++v) acc[r][v] = start[v];
    half[r] = half_start;
  }
  const std::int64_t cin = t.in_channels;
  for (int ky = 0; ky < t.kernel_h; ++ky) {
    for (int kx = 0; kx < t.kernel_w; ++kx) {
      const float* x = t.x + ky * t.row_step + kx * cin;
      const float* w = t.w + (ky * t.kernel_w + kx) * cin * kLanes;
      for (std::int64_t c = 0; c < cin; ++c) {
        __m512 wv[NZ > 0 ? NZ : 1];
#pragma GCC unroll 2
        for (int v = 0; v < NZ; ++v) wv[v] = _mm512_loadu_ps(w + v * t.block_step + c * kLanes);
        const __m256 wh = Half ? _mm256_loadu_ps(w + NZ * t.block_step + c * kLanes) : _mm256_setzero_ps();
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) {
          const float xr = x[r * t.pixel_step + c];
          const __m512 xb = _mm512_set1_ps(xr);
#pragma GCC unroll 2
          for (int v = 0; v < NZ; ++v) acc[r][v] = _mm512_fmadd_ps(xb, wv[v], acc[r][v]);
          if constexpr (Half) half[r] = _mm256_fmadd_ps(_mm256_set1_ps(xr), wh, half[r]);
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int r = 0; r < R; ++r) {
    if (t.row_scale != nullptr) {
      const float factor = t.row_scale[r];
#pragma GCC unroll 2
      for (int v = 0; v < NZ; ++v) acc[r][v] = _mm512_mul_ps(acc[r][v], _mm512_set1_ps(factor));
      half[r] = _mm256_mul_ps(half[r], _mm256_set1_ps(factor));
    }
#pragma GCC unroll 2
    for (int v = 0; v < NZ; ++v) {
      float* out = t.out + r * t.out_step + v * kLanes;
      if (v == NV - 1 && t.last_lanes < kLanes) {
        _mm512_mask_storeu_ps(out, last, acc[r][v]);
      } else {
        _mm512_storeu_ps(out, acc[r][v]);
      }
    }
    if constexpr (Half) _mm256_maskstore_ps(t.out + r * t.out_step + NZ * kLanes, half_lanes, half[r]);
  }
}

// tile_avx512<R, NV, Half> for runtime R in 1..8, NV in 1..2, the last block in a ymm where it has <= 8 lanes.
template <int R>
inline void tile_avx512_blocks(const Tile& t, int blocks) {
  const bool half = t.last_lanes <= kLanes / 2;
  if (blocks == 2) {
    half ? tile_avx512<R, 2, true>(t) : tile_avx512<R, 2, false>(t);
  } else {
    half ? tile_avx512<R, 1, true>(t) : tile_avx512<R, 1, false>(t);
  }
}

inline void tile_avx512_any(const Tile& t, int pixels, int blocks) {
  switch (pixels) {
    case 1: return tile_avx512_blocks<1>(t, blocks);
    case 2: return tile_avx512_blocks<2>(t, blocks);
    case 3: return tile_avx512_blocks<3>(t, blocks);
    case 4: return tile_avx512_blocks<4>(t, blocks);
    case 5: return tile_avx512_blocks<5>(t, blocks);
    case 6: return tile_avx512_blocks<6>(t, blocks);
    case 7: return tile_avx512_blocks<7>(t, blocks);
    default: return tile_avx512_blocks<8>(t, blocks);
  }
}
#endif

// The portable loop: the same tiles and summation order, a multiply and an add per term (no FMA).
inline void tile_generic(const Tile& t, int pixels, int blocks) {
  float acc[kTilePixels][kTileBlocks * kLanes] = {};
  const int channels = (blocks - 1) * kLanes + t.last_lanes;
  if (t.bias != nullptr) {
    for (int r = 0; r < pixels; ++r) std::copy(t.bias, t.bias + channels, acc[r]);
  }
  const std::int64_t cin = t.in_channels;
  for (int ky = 0; ky < t.kernel_h; ++ky) {
    for (int kx = 0; kx < t.kernel_w; ++kx) {
      const float* x = t.x + ky * t.row_step + kx * cin;
      const float* w = t.w + (ky * t.kernel_w + kx) * cin * kLanes;
      for (std::int64_t c = 0; c < cin; ++c) {
        for (int r = 0; r < pixels; ++r) {
          const float xv = x[r * t.pixel_step + c];
          for (int v = 0; v < blocks; ++v) {
            const float* wv = w + v * t.block_step + c * kLanes;
            float* a = acc[r] + v * kLanes;
            for (int l = 0; l < kLanes; ++l) a[l] += xv * wv[l];
          }
        }
      }
    }
  }
  for (int r = 0; r < pixels; ++r) {
    if (t.row_scale != nullptr) {
      for (float& a : acc[r]) a *= t.row_scale[r];
    }
    for (int v = 0; v < blocks; ++v) {
      const int lanes = v == blocks - 1 ? t.last_lanes : kLanes;
      std::copy(acc[r] + v * kLanes, acc[r] + v * kLanes + lanes, t.out + r * t.out_step + v * kLanes);
    }
  }
}

// parallel_ranges' min_per_thread for the micro-kernel's users (conv2d_cpu.cpp, conv2d_winograd_cpu.cpp,
// attention_cpu.cpp), in work items of `macs_per_item` multiply-adds each: at least 2^18 multiply-adds per thread,
// ~1-2 us of one core's work (a thread's wake-up costs microseconds).
inline std::int64_t min_items_per_thread(std::int64_t macs_per_item) {
  return std::max<std::int64_t>(1, (std::int64_t{1} << 18) / macs_per_item);
}

// One tile of `pixels` rows and `blocks` blocks, by the AVX-512 loop where `avx512` (the caller checked
// cpu_has_avx512()), else the portable one.
inline void run_tile(const Tile& t, int pixels, int blocks, bool avx512) {
#ifdef BLITZDIFF_HAVE_AVX512_TILE
  if (avx512) {
    tile_avx512_any(t, pixels, blocks);
    return;
  }
#endif
  (void)avx512;
  tile_generic(t, pixels, blocks);
}

}  // namespace blitzdiff
