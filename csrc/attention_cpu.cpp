// CPU kernel of the attention op, float32: out = softmax(q k^T * scale) v; see attention.h for the contract.
//
// Work item: one (sample, head) and up to kQueryBlock query rows. The item packs k^T as [ceil(Lk / 16), D, 16] and v
// as [ceil(D / 16), Lk, 16] (zero lanes past Lk / D), then per tile of kTilePixels query rows: the scores s = q k^T
// by tile_kernel.h's micro-kernel (rows: queries, read in place through their stride; inner dimension: D), each
// row's exp(scale * s - its max) and their sum, and p v by the same micro-kernel (inner dimension: Lk), each row
// divided by its sum as it is stored (D products per row instead of Lk probabilities) straight into out's
// [B, Lq, H, D] rows. The score rows of a tile stay in L1 (8 x Lk floats); nothing of size Lq x Lk is stored. Every
// query row's result depends only on its own (sample, head), whatever the split over threads.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "attention.h"
#include "parallel.h"
#include "tile_kernel.h"
#include "vectorize.h"

namespace blitzdiff {
namespace {

constexpr std::int64_t kQueryBlock = 64;                           // query rows per work item

// Row r of s (n scores, row stride `stride`) -> exp(scale * s - max) by exp_approx (vectorize.h), max the row's
// largest scale * s (the smallest s where scale < 0), and inverse[r] = 1 / the row's sum (applied to p v's rows: 24
// or 64 products per row instead of Lk probabilities). The portable loop.
void softmax_rows_generic(float* s, int rows, std::int64_t stride, std::int64_t n, float scale, float* inverse) {
  for (int r = 0; r < rows; ++r) {
    float* row = s + r * stride;
    float top = -std::numeric_limits<float>::infinity();
    for (std::int64_t j = 0; j < n; ++j) top = std::max(top, row[j] * scale);
    float sum = 0;
    for (std::int64_t j = 0; j < n; ++j) {
      row[j] = exp_approx(row[j] * scale - top);
      sum += row[j];
    }
    inverse[r] = 1.0f / sum;
  }
}

#ifdef BLITZDIFF_HAVE_AVX512_TILE
// 2^t on 16 lanes for t <= 0 (a score times scale * log2(e), minus the row's largest such): t = n + f with n the
// nearest integer and f = t - n exact in [-1/2, 1/2], 2^f = 1 + f P(f) (Cephes' exp2f polynomial, relative error
// 2e-9 on that range), times 2^n by scalef. Clamped below at -126, where 2^n stays a normal float.
__attribute__((target("avx512f"))) inline __m512 exp2_nonpositive(__m512 t) {
  t = _mm512_max_ps(t, _mm512_set1_ps(-126.0f));
  const __m512 n = _mm512_roundscale_ps(t, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m512 f = _mm512_sub_ps(t, n);
  __m512 p = _mm512_set1_ps(1.535336188319500e-4f);
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(1.339887440266574e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(9.618437357674640e-3f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(5.550332471162809e-2f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(2.402264791363012e-1f));
  p = _mm512_fmadd_ps(p, f, _mm512_set1_ps(6.931472028550421e-1f));
  return _mm512_scalef_ps(_mm512_fmadd_ps(p, f, _mm512_set1_ps(1.0f)), n);
}

// softmax_rows_generic with 16-lane max, exp and sums (a masked tail), in base 2: with a = scale * log2(e) and top
// the row's largest s * a, each exponent is one FMA, s * a - top (at most the rounding of top above 0).
__attribute__((target("avx512f"))) void softmax_rows_avx512(float* s, int rows, std::int64_t stride, std::int64_t n,
                                                            float scale, float* inverse) {
  const std::int64_t full = n - n % kLanes;
  const auto tail = static_cast<__mmask16>((1u << (n - full)) - 1u);
  const float a = scale * 1.44269504088896341f;
  const __m512 a_v = _mm512_set1_ps(a);
  for (int r = 0; r < rows; ++r) {
    float* row = s + r * stride;
    __m512 top = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    for (std::int64_t j = 0; j < full; j += kLanes) {
      top = _mm512_max_ps(top, _mm512_mul_ps(_mm512_loadu_ps(row + j), a_v));
    }
    if (tail) top = _mm512_mask_max_ps(top, tail, top, _mm512_mul_ps(_mm512_maskz_loadu_ps(tail, row + full), a_v));
    const __m512 shift = _mm512_set1_ps(-_mm512_reduce_max_ps(top));
    __m512 sum = _mm512_setzero_ps();
    for (std::int64_t j = 0; j < full; j += kLanes) {
      const __m512 p = exp2_nonpositive(_mm512_fmadd_ps(_mm512_loadu_ps(row + j), a_v, shift));
      _mm512_storeu_ps(row + j, p);
      sum = _mm512_add_ps(sum, p);
    }
    if (tail) {
      const __m512 p = exp2_nonpositive(_mm512_fmadd_ps(_mm512_maskz_loadu_ps(tail, row + full), a_v, shift));
      _mm512_mask_storeu_ps(row + full, tail, p);
      sum = _mm512_mask_add_ps(sum, tail, sum, p);
    }
    inverse[r] = 1.0f / _mm512_reduce_add_ps(sum);
  }
}
#endif

void softmax_rows(float* s, int rows, std::int64_t stride, std::int64_t n, float scale, float* inverse, bool avx512) {
#ifdef BLITZDIFF_HAVE_AVX512_TILE
  if (avx512) {
    softmax_rows_avx512(s, rows, stride, n, scale, inverse);
    return;
  }
#endif
  softmax_rows_generic(s, rows, stride, n, scale, inverse);
}

struct Operand {
  const float* data;
  std::int64_t stride_b, stride_h, stride_l;
  const float* row(std::int64_t b, std::int64_t h, std::int64_t l) const {
    return data + b * stride_b + h * stride_h + l * stride_l;
  }
};

#ifdef BLITZDIFF_HAVE_AVX512_TILE
// pack_values' copies as masked 16-lane loads and stores (std::copy of a run-time length calls memmove).
__attribute__((target("avx512f"))) void pack_values_avx512(const Operand& v, std::int64_t b, std::int64_t h,
                                                           std::int64_t len_k, std::int64_t head_dim, float* out) {
  for (std::int64_t j = 0; j < len_k; ++j) {
    const float* value = v.row(b, h, j);
    for (std::int64_t d0 = 0; d0 < head_dim; d0 += kLanes) {
      const auto lanes = static_cast<__mmask16>((1u << std::min<std::int64_t>(kLanes, head_dim - d0)) - 1u);
      _mm512_mask_storeu_ps(out + (d0 * len_k + j * kLanes), lanes, _mm512_maskz_loadu_ps(lanes, value + d0));
    }
  }
}
#endif

// k^T of one (sample, head) as [ceil(Lk / 16), D, 16]: lane l of block kb, row d holds k[kb * 16 + l, d] (lanes
// past Lk keep the zeros they were made with).
void pack_keys(const Operand& k, std::int64_t b, std::int64_t h, std::int64_t len_k, std::int64_t head_dim,
               float* out) {
  for (std::int64_t j0 = 0; j0 < len_k; j0 += kLanes) {
    const std::int64_t lanes = std::min<std::int64_t>(kLanes, len_k - j0);
    float* block = out + j0 * head_dim;  // (j0 / 16) * D * 16
    for (std::int64_t l = 0; l < lanes; ++l) {
      const float* key = k.row(b, h, j0 + l);
      for (std::int64_t d = 0; d < head_dim; ++d) block[d * kLanes + l] = key[d];
    }
  }
}

// v of one (sample, head) as [ceil(D / 16), Lk, 16]: block db, row j holds v[j, db * 16 .. db * 16 + 15] (lanes past
// D keep their zeros): 16-value copies, one masked load and store each on AVX-512.
void pack_values(const Operand& v, std::int64_t b, std::int64_t h, std::int64_t len_k, std::int64_t head_dim,
                 float* out, bool avx512) {
#ifdef BLITZDIFF_HAVE_AVX512_TILE
  if (avx512) {
    pack_values_avx512(v, b, h, len_k, head_dim, out);
    return;
  }
#endif
  for (std::int64_t j = 0; j < len_k; ++j) {
    const float* value = v.row(b, h, j);
    for (std::int64_t d0 = 0; d0 < head_dim; d0 += kLanes) {
      std::copy(value + d0, value + std::min(head_dim, d0 + kLanes), out + (d0 * len_k + j * kLanes));
    }
  }
}

// A product over the micro-kernel: `rows` rows of x (row stride x_step, `inner` values each) times the packed
// [blocks, inner, 16] matrix w, the first `columns` columns written to out (row stride out_step), each row times
// row_scale[row] where given.
void tiled_product(const float* x, std::int64_t x_step, int rows, std::int64_t inner, const float* w,
                   std::int64_t columns, float* out, std::int64_t out_step, bool avx512,
                   const float* row_scale = nullptr) {
  const std::int64_t blocks = (columns + kLanes - 1) / kLanes;
  Tile t{};
  t.x = x;
  t.row_scale = row_scale;
  t.pixel_step = x_step;
  t.block_step = inner * kLanes;
  t.out_step = out_step;
  t.in_channels = inner;
  t.kernel_h = t.kernel_w = 1;
  for (std::int64_t block = 0; block < blocks; block += kTileBlocks) {
    const int tile_blocks = static_cast<int>(std::min<std::int64_t>(kTileBlocks, blocks - block));
    t.w = w + block * t.block_step;
    t.out = out + block * kLanes;
    t.last_lanes = static_cast<int>(std::min<std::int64_t>(kLanes, columns - (block + tile_blocks - 1) * kLanes));
    run_tile(t, rows, tile_blocks, avx512);
  }
}

}  // namespace

void attention_cpu(std::uintptr_t out, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::int64_t batch,
                   std::int64_t heads, std::int64_t len_q, std::int64_t len_k, std::int64_t head_dim,
                   std::int64_t q_stride_b, std::int64_t q_stride_h, std::int64_t q_stride_l,
                   std::int64_t k_stride_b, std::int64_t k_stride_h, std::int64_t k_stride_l,
                   std::int64_t v_stride_b, std::int64_t v_stride_h, std::int64_t v_stride_l, double scale,
                   std::int64_t threads, bool generic) {
  check_threads("attention_cpu", threads);
  if (batch < 0 || heads < 0 || len_q < 0 || len_k < 0 || head_dim < 1) {
    throw std::invalid_argument("attention_cpu: need batch, heads, len_q, len_k >= 0 and head_dim >= 1, got " +
                                std::to_string(batch) + ", " + std::to_string(heads) + ", " + std::to_string(len_q) +
                                ", " + std::to_string(len_k) + ", " + std::to_string(head_dim));
  }
  if (batch * heads * len_q == 0) return;
  if (len_k < 1) throw std::invalid_argument("attention_cpu: len_k must be >= 1 for a non-empty output");
  if (out == 0 || q == 0 || k == 0 || v == 0) {
    throw std::invalid_argument("attention_cpu: out, q, k and v must be non-null pointers");
  }
  const Operand qs{reinterpret_cast<const float*>(q), q_stride_b, q_stride_h, q_stride_l};
  const Operand ks{reinterpret_cast<const float*>(k), k_stride_b, k_stride_h, k_stride_l};
  const Operand vs{reinterpret_cast<const float*>(v), v_stride_b, v_stride_h, v_stride_l};
  auto* output = reinterpret_cast<float*>(out);
  const bool avx512 = !generic && cpu_has_avx512();
  const auto scale_f = static_cast<float>(scale);
  const std::int64_t key_blocks = (len_k + kLanes - 1) / kLanes, dim_blocks = (head_dim + kLanes - 1) / kLanes;
  const std::int64_t padded_keys = key_blocks * kLanes;
  const std::int64_t query_blocks = (len_q + kQueryBlock - 1) / kQueryBlock;
  const std::int64_t items = batch * heads * query_blocks;
  const std::int64_t macs_per_item = std::min(kQueryBlock, len_q) * len_k * head_dim * 2;

  parallel_ranges(items, min_items_per_thread(macs_per_item), threads,
                  [&](std::int64_t first, std::int64_t last) {
    std::vector<float> keys(key_blocks * head_dim * kLanes, 0.0f);  // k^T [key block, d, 16]
    std::vector<float> values(dim_blocks * len_k * kLanes, 0.0f);   // v [d block, key, 16]
    std::vector<float> scores(kTilePixels * padded_keys);
    float inverse[kTilePixels];  // per score row, 1 / its sum
    std::int64_t packed = -1;  // the (sample, head) packed in keys / values
    for (std::int64_t item = first; item < last; ++item) {
      const std::int64_t pair = item / query_blocks, b = pair / heads, h = pair % heads;
      if (pair != packed) {
        pack_keys(ks, b, h, len_k, head_dim, keys.data());
        pack_values(vs, b, h, len_k, head_dim, values.data(), avx512);
        packed = pair;
      }
      const std::int64_t q0 = item % query_blocks * kQueryBlock, q1 = std::min(len_q, q0 + kQueryBlock);
      for (std::int64_t r0 = q0; r0 < q1; r0 += kTilePixels) {
        const int rows = static_cast<int>(std::min<std::int64_t>(kTilePixels, q1 - r0));
        tiled_product(qs.row(b, h, r0), q_stride_l, rows, head_dim, keys.data(), len_k, scores.data(), padded_keys,
                      avx512);
        softmax_rows(scores.data(), rows, padded_keys, len_k, scale_f, inverse, avx512);
        tiled_product(scores.data(), padded_keys, rows, len_k, values.data(), head_dim,
                      output + ((b * len_q + r0) * heads + h) * head_dim, heads * head_dim, avx512, inverse);
      }
    }
  });
}

}  // namespace blitzdiff
