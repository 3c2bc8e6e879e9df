// CUDA flash-attention forward; see attention.h for the contract.
//
// FlashAttention-2's forward (Dao 2023, Algorithm 1): a block owns a tile of query rows of one (batch, head) and
// streams K/V in tiles through shared memory, keeping per row a running maximum m, a running sum l and an
// unnormalized output O in float32 registers; each new tile rescales l and O by exp(m_old - m_new), and O / l is
// written once at the end. The [len_q, len_k] score matrix never exists in memory.
//
// Half types (float16 / bfloat16): 4 warps, 64 query rows (16 per warp) x 64-key tiles, mma.sync.m16n8k16 with
// float32 accumulation. Q fragments stay in registers for the whole key loop; K is read with ldmatrix, V with
// ldmatrix.trans; the S accumulator fragments are re-packed in registers as the A operand of P V (FlashAttention-2's
// register reuse). Probabilities are rounded to the input type for P V, and l sums those rounded values, so the
// weights applied to V are normalized exactly. Scores are scaled before the maximum (a negative scale is fine) and
// exponentiated as exp2 with log2(e) folded into the scale.
// float32: CUDA-core FMAs, 32 query rows x 32-key tiles, each thread a 4 x 2 block of scores accumulated in four
// interleaved chains (d mod 4, summed pairwise: a blocked BLAS's accuracy, not one chain of length head_dim), then
// P through shared memory into a 4 x head_dim/16 block of O; expf of the scaled scores as in the reference.
//
// Tiles arrive by cp.async (16-byte chunks; rows past len_q / len_k and columns past head_dim are zero-filled, so
// padded keys and head-dimension columns contribute exact zeros). K and V have one buffer each and separate
// commit groups: V_j lands while S = Q K_j^T is computed, K_{j+1} while P V_j is. Shared rows are padded by 16
// bytes, which makes ldmatrix and the float4 reads conflict-free. Keys past len_k get score -inf; every tile holds
// at least one real key, so the running maximum is finite after the first tile and l >= 1. The head dimension is
// padded (with those zero columns) to the next of 32, 48, 64, 80, 96, 128: one instantiation per width and type.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <stdexcept>
#include <type_traits>

#include "attention.h"

namespace blitzdiff {
namespace {

constexpr int kThreads = 128;           // 4 warps per block, both kernels
constexpr unsigned kMaxGridYZ = 65535;  // gridDim.y / gridDim.z limit
constexpr float kLog2e = 1.4426950408889634f;

struct Params {
  const void* q;
  const void* k;
  const void* v;
  void* out;                                    // dense [batch, len_q, heads, head_dim]
  std::int64_t q_sb, q_sh, q_sl, k_sb, k_sh, k_sl, v_sb, v_sh, v_sl;  // element strides: batch, head, row
  int heads, len_q, len_k, head_dim;
  float scale;  // the half kernel takes scale * log2(e), the float32 kernel the scale itself
};

// ---- cp.async, ldmatrix, mma.sync (sm_80+) ----

__device__ inline void cp_async_16(void* smem, const void* gmem, bool valid) {
  // src-size 0 copies nothing and zero-fills the 16 destination bytes; gmem stays a valid address regardless.
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(valid ? 16 : 0)
               : "memory");
}
__device__ inline void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
// Waits until at most one committed group (the newest) is still in flight.
__device__ inline void cp_async_wait_all_but_newest() { asm volatile("cp.async.wait_group 1;\n" ::: "memory"); }

// Copies rows [0, rows_valid) x columns [0, head_dim) of a [kRows, kD] tile from global rows `row_stride` elements
// apart into shared rows kStride elements apart; the rest of the tile is zero-filled.
template <typename T, int kD, int kRows, int kStride>
__device__ inline void load_tile(T* smem, const T* gmem, std::int64_t row_stride, int rows_valid, int head_dim) {
  constexpr int kVec = 16 / sizeof(T);  // elements per 16-byte chunk
  constexpr int kChunksPerRow = kD / kVec;
  for (int c = threadIdx.x; c < kRows * kChunksPerRow; c += kThreads) {
    const int row = c / kChunksPerRow, col = (c % kChunksPerRow) * kVec;
    const bool valid = row < rows_valid && col < head_dim;  // head_dim % kVec == 0: chunks are all in or all out
    cp_async_16(smem + row * kStride + col, valid ? gmem + row * row_stride + col : gmem, valid);
  }
}

// One block's shared-memory tiles, (batch, head) = (blockIdx.z, blockIdx.y): kM query rows from m0 and kN-key tiles
// of K and V, rows kStride elements apart. Construction issues the prologue of the pipeline described at the top:
// Q and K_0 as one commit group, V_0 as the next.
template <typename T, int kD, int kM, int kN, int kStride>
struct Tiles {
  T* sQ;
  T* sK;
  T* sV;
  const T* k;
  const T* v;
  std::int64_t k_sl, v_sl;
  int len_k, head_dim;

  __device__ Tiles(const Params& p, T* smem, int m0)
      : sQ(smem),
        sK(smem + kM * kStride),
        sV(smem + (kM + kN) * kStride),
        k(static_cast<const T*>(p.k) + blockIdx.z * p.k_sb + blockIdx.y * p.k_sh),
        v(static_cast<const T*>(p.v) + blockIdx.z * p.v_sb + blockIdx.y * p.v_sh),
        k_sl(p.k_sl),
        v_sl(p.v_sl),
        len_k(p.len_k),
        head_dim(p.head_dim) {
    const T* q = static_cast<const T*>(p.q) + blockIdx.z * p.q_sb + blockIdx.y * p.q_sh + m0 * p.q_sl;
    load_tile<T, kD, kM, kStride>(sQ, q, p.q_sl, min(kM, p.len_q - m0), head_dim);
    load_k(0);
    cp_async_commit();
    load_v(0);
    cp_async_commit();
  }
  // Keys n0 .. n0 + kN - 1 (those past len_k zero-filled) into sK / sV.
  __device__ void load_k(int n0) const {
    load_tile<T, kD, kN, kStride>(sK, k + n0 * k_sl, k_sl, min(kN, len_k - n0), head_dim);
  }
  __device__ void load_v(int n0) const {
    load_tile<T, kD, kN, kStride>(sV, v + n0 * v_sl, v_sl, min(kN, len_k - n0), head_dim);
  }
};

__device__ inline void ldmatrix_x4(unsigned (&r)[4], const void* smem_row) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}
__device__ inline void ldmatrix_x4_trans(unsigned (&r)[4], const void* smem_row) {
  const unsigned a = static_cast<unsigned>(__cvta_generic_to_shared(smem_row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(a));
}

// float16 / bfloat16 pairs and the m16n8k16 tensor-core MMA for T: d += a (16x16, row-major) * b (16x8, col-major).
template <typename T> struct Half {
  static constexpr bool kFp16 = std::is_same_v<T, __half>;
  using T2 = std::conditional_t<kFp16, __half2, __nv_bfloat162>;
  __device__ static T2 pack(float lo, float hi) {
    if constexpr (kFp16) return __floats2half2_rn(lo, hi);
    else return __floats2bfloat162_rn(lo, hi);
  }
  __device__ static float2 unpack(T2 x) {
    if constexpr (kFp16) return __half22float2(x);
    else return __bfloat1622float2(x);
  }
  __device__ static void mma(float (&d)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
#define BLITZDIFF_MMA(AB)                                                                                 \
  asm("mma.sync.aligned.m16n8k16.row.col.f32." AB "." AB ".f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "      \
      "{%8, %9}, {%0, %1, %2, %3};\n"                                                                     \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                                    \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1))
    if constexpr (kFp16) BLITZDIFF_MMA("f16");
    else BLITZDIFF_MMA("bf16");
#undef BLITZDIFF_MMA
  }
};

template <typename T2> __device__ inline unsigned bits(T2 x) {
  unsigned u;
  memcpy(&u, &x, sizeof(u));
  return u;
}

// ---- float16 / bfloat16: tensor cores ----

constexpr int kHalfM = 64, kHalfN = 64;  // query rows per block (16 per warp), keys per tile

template <int kD> constexpr int half_smem_bytes() { return (kHalfM + 2 * kHalfN) * (kD + 8) * 2; }

template <typename T, int kD>
__global__ void __launch_bounds__(kThreads) attention_half(Params p) {
  using H = Half<T>;
  using T2 = typename H::T2;
  constexpr int kStride = kD + 8;  // shared row stride in elements: 16 bytes of padding
  constexpr int kSteps = kD / 16;  // k-steps of Q K^T; also pairs of 8-column tiles of O
  constexpr int kTilesN = kHalfN / 8;
  extern __shared__ uint4 smem_raw[];  // uint4: 16-byte aligned
  const int m0 = blockIdx.x * kHalfM;
  const Tiles<T, kD, kHalfM, kHalfN, kStride> tiles(p, reinterpret_cast<T*>(smem_raw), m0);
  const T* sQ = tiles.sQ;
  const T* sK = tiles.sK;
  const T* sV = tiles.sV;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, t = lane % 4;  // mma fragment coordinates: rows g and g + 8, columns 2t and 2t + 1
  const int n_tiles = (p.len_k + kHalfN - 1) / kHalfN;

  unsigned qf[kSteps][4];  // A fragments of this warp's 16 query rows
  float o[2 * kSteps][4] = {};  // O accumulators: 8-column tiles of the head dimension
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};  // rows g and g + 8; l is this thread's partial sum

  for (int j = 0; j < n_tiles; ++j) {
    const int n0 = j * kHalfN;
    cp_async_wait_all_but_newest();  // K_j (and Q) landed; V_j may be in flight
    __syncthreads();
    if (j == 0) {
#pragma unroll
      for (int s = 0; s < kSteps; ++s) {
        ldmatrix_x4(qf[s], sQ + (warp * 16 + lane % 16) * kStride + s * 16 + (lane / 16) * 8);
      }
    }
    // S = Q K_j^T: ldmatrix.x4 gives the B fragments (b0, b1) of two adjacent 8-key tiles.
    float sc[kTilesN][4] = {};
#pragma unroll
    for (int s = 0; s < kSteps; ++s) {
#pragma unroll
      for (int jj = 0; jj < kTilesN; jj += 2) {
        unsigned b[4];
        ldmatrix_x4(b, sK + (jj * 8 + lane % 8 + (lane / 16) * 8) * kStride + s * 16 + ((lane / 8) % 2) * 8);
        H::mma(sc[jj], qf[s], b[0], b[1]);
        H::mma(sc[jj + 1], qf[s], b[2], b[3]);
      }
    }
    __syncthreads();  // every warp is done with sK
    if (j + 1 < n_tiles) tiles.load_k(n0 + kHalfN);
    cp_async_commit();  // group: K_{j+1} (empty on the last tile, which keeps the group count uniform)

    // Online softmax on rows g (sc[.][0..1]) and g + 8 (sc[.][2..3]); a row's 4 threads are lanes 4g .. 4g + 3.
    const bool tail = n0 + kHalfN > p.len_k;
    float mx[2] = {-INFINITY, -INFINITY};
#pragma unroll
    for (int jj = 0; jj < kTilesN; ++jj) {
#pragma unroll
      for (int c = 0; c < 4; ++c) {
        const bool valid = !tail || n0 + jj * 8 + 2 * t + (c % 2) < p.len_k;
        sc[jj][c] = valid ? sc[jj][c] * p.scale : -INFINITY;
        mx[c / 2] = fmaxf(mx[c / 2], sc[jj][c]);
      }
    }
    float alpha[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
      mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
      const float m_new = fmaxf(m[r], mx[r]);  // finite: the tile's first key is real
      alpha[r] = exp2f(m[r] - m_new);          // 0 on the first tile (m = -inf)
      m[r] = m_new;
      l[r] *= alpha[r];
    }
#pragma unroll
    for (int dn = 0; dn < 2 * kSteps; ++dn) {
#pragma unroll
      for (int c = 0; c < 4; ++c) o[dn][c] *= alpha[c / 2];
    }
    // P as A fragments of P V_j: the 16 keys of k-step kk are the 8-key tiles 2kk and 2kk + 1.
    unsigned pf[kTilesN / 2][4];
#pragma unroll
    for (int kk = 0; kk < kTilesN / 2; ++kk) {
#pragma unroll
      for (int h = 0; h < 4; ++h) {  // h: (row g, keys 2t..), (row g + 8, ..), (row g, keys 8 + 2t..), (row g + 8, ..)
        const float* src = sc[2 * kk + h / 2] + 2 * (h % 2);
        const T2 pr = H::pack(exp2f(src[0] - m[h % 2]), exp2f(src[1] - m[h % 2]));
        const float2 rounded = H::unpack(pr);
        l[h % 2] += rounded.x + rounded.y;
        pf[kk][h] = bits(pr);
      }
    }

    cp_async_wait_all_but_newest();  // V_j landed; K_{j+1} may be in flight
    __syncthreads();
    // O += P V_j: ldmatrix.x4.trans gives the B fragments (b0, b1) of two adjacent 8-column tiles of V.
#pragma unroll
    for (int kk = 0; kk < kTilesN / 2; ++kk) {
#pragma unroll
      for (int s = 0; s < kSteps; ++s) {
        unsigned b[4];
        ldmatrix_x4_trans(b, sV + (kk * 16 + lane % 8 + ((lane / 8) % 2) * 8) * kStride + s * 16 + (lane / 16) * 8);
        H::mma(o[2 * s], pf[kk], b[0], b[1]);
        H::mma(o[2 * s + 1], pf[kk], b[2], b[3]);
      }
    }
    __syncthreads();  // every warp is done with sV
    if (j + 1 < n_tiles) tiles.load_v(n0 + kHalfN);
    cp_async_commit();  // group: V_{j+1}
  }

  // O / l, staged as T in this warp's own 16 rows of sQ (read only by this warp, at j == 0), then 16-byte stores.
#pragma unroll
  for (int r = 0; r < 2; ++r) {
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
    l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
  }
  T* so = tiles.sQ + warp * 16 * kStride;
#pragma unroll
  for (int dn = 0; dn < 2 * kSteps; ++dn) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const T2 val = H::pack(o[dn][2 * r] / l[r], o[dn][2 * r + 1] / l[r]);
      *reinterpret_cast<T2*>(so + (g + 8 * r) * kStride + dn * 8 + 2 * t) = val;
    }
  }
  __syncwarp();
  const std::int64_t out_row = static_cast<std::int64_t>(p.heads) * p.head_dim;  // out: [batch, len_q, heads, D]
  T* out = static_cast<T*>(p.out) + static_cast<std::int64_t>(blockIdx.z) * p.len_q * out_row +
           static_cast<std::int64_t>(blockIdx.y) * p.head_dim;
  constexpr int kChunksPerRow = kD / 8;
  for (int c = lane; c < 16 * kChunksPerRow; c += 32) {
    const int r = c / kChunksPerRow, col = (c % kChunksPerRow) * 8;
    const int row = m0 + warp * 16 + r;
    if (row < p.len_q && col < p.head_dim) {
      *reinterpret_cast<uint4*>(out + row * out_row + col) =
          *reinterpret_cast<const uint4*>(so + r * kStride + col);
    }
  }
}

// ---- float32: CUDA cores ----

constexpr int kF32M = 32, kF32N = 32;  // query rows per block, keys per tile

template <int kD> constexpr int f32_smem_bytes() {
  return ((kF32M + 2 * kF32N) * (kD + 4) + kF32M * (kF32N + 1)) * 4;  // Q, K, V tiles and P
}

template <int kD>
__global__ void __launch_bounds__(kThreads) attention_f32(Params p) {
  constexpr int kStride = kD + 4;      // shared row stride in floats: 16 bytes of padding
  constexpr int kPStride = kF32N + 1;  // P rows 4 apart fall in different banks
  constexpr int kCols = kD / 16;       // O columns per thread: cg, cg + 16, ...
  extern __shared__ float4 smem_f4[];
  const int m0 = blockIdx.x * kF32M;
  const Tiles<float, kD, kF32M, kF32N, kStride> tiles(p, reinterpret_cast<float*>(smem_f4), m0);
  const float* sQ = tiles.sQ;
  const float* sK = tiles.sK;
  const float* sV = tiles.sV;
  float* sP = tiles.sV + kF32N * kStride;
  // Thread (rg, cg) owns query rows 4rg .. 4rg + 3, keys cg and cg + 16 of each tile, O columns cg + 16i; the 16
  // threads of a row group are one half-warp.
  const int rg = threadIdx.x / 16, cg = threadIdx.x % 16;
  const int n_tiles = (p.len_k + kF32N - 1) / kF32N;

  float o[4][kCols] = {};
  float m[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY}, l[4] = {};  // l: this thread's partial sums

  for (int j = 0; j < n_tiles; ++j) {
    const int n0 = j * kF32N;
    cp_async_wait_all_but_newest();  // Q, K_j landed; V_j may be in flight
    __syncthreads();
    float4 acc[4][2] = {};  // scores of (row 4rg + r, key cg + 16c), one FMA chain per d mod 4
#pragma unroll 4
    for (int d = 0; d < kD; d += 4) {
      float4 qv[4], kv[2];
#pragma unroll
      for (int r = 0; r < 4; ++r) qv[r] = *reinterpret_cast<const float4*>(sQ + (4 * rg + r) * kStride + d);
#pragma unroll
      for (int c = 0; c < 2; ++c) kv[c] = *reinterpret_cast<const float4*>(sK + (cg + 16 * c) * kStride + d);
#pragma unroll
      for (int r = 0; r < 4; ++r) {
#pragma unroll
        for (int c = 0; c < 2; ++c) {
          acc[r][c].x = fmaf(qv[r].x, kv[c].x, acc[r][c].x);
          acc[r][c].y = fmaf(qv[r].y, kv[c].y, acc[r][c].y);
          acc[r][c].z = fmaf(qv[r].z, kv[c].z, acc[r][c].z);
          acc[r][c].w = fmaf(qv[r].w, kv[c].w, acc[r][c].w);
        }
      }
    }
    __syncthreads();  // every thread is done with sK (and, from the last tile, with sP)
    if (j + 1 < n_tiles) tiles.load_k(n0 + kF32N);
    cp_async_commit();  // group: K_{j+1} (empty on the last tile)

#pragma unroll
    for (int r = 0; r < 4; ++r) {
      float x[2];
#pragma unroll
      for (int c = 0; c < 2; ++c) {
        const float dot = (acc[r][c].x + acc[r][c].y) + (acc[r][c].z + acc[r][c].w);
        x[c] = n0 + cg + 16 * c < p.len_k ? dot * p.scale : -INFINITY;
      }
      float mx = fmaxf(x[0], x[1]);
#pragma unroll
      for (int lane_mask = 1; lane_mask < 16; lane_mask *= 2) {
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, lane_mask));
      }
      const float m_new = fmaxf(m[r], mx);  // finite: the tile's first key is real
      const float alpha = expf(m[r] - m_new);  // 0 on the first tile (m = -inf)
      m[r] = m_new;
      const float p0 = expf(x[0] - m_new), p1 = expf(x[1] - m_new);
      l[r] = l[r] * alpha + (p0 + p1);
#pragma unroll
      for (int i = 0; i < kCols; ++i) o[r][i] *= alpha;
      sP[(4 * rg + r) * kPStride + cg] = p0;
      sP[(4 * rg + r) * kPStride + cg + 16] = p1;
    }

    cp_async_wait_all_but_newest();  // V_j landed; K_{j+1} may be in flight
    __syncthreads();                 // and P is complete
#pragma unroll 4
    for (int n = 0; n < kF32N; ++n) {
      float pr[4], vv[kCols];
#pragma unroll
      for (int r = 0; r < 4; ++r) pr[r] = sP[(4 * rg + r) * kPStride + n];
#pragma unroll
      for (int i = 0; i < kCols; ++i) vv[i] = sV[n * kStride + cg + 16 * i];
#pragma unroll
      for (int r = 0; r < 4; ++r) {
#pragma unroll
        for (int i = 0; i < kCols; ++i) o[r][i] = fmaf(pr[r], vv[i], o[r][i]);
      }
    }
    __syncthreads();  // every thread is done with sV
    if (j + 1 < n_tiles) tiles.load_v(n0 + kF32N);
    cp_async_commit();  // group: V_{j+1}
  }

  const std::int64_t out_row = static_cast<std::int64_t>(p.heads) * p.head_dim;  // out: [batch, len_q, heads, D]
  float* out = static_cast<float*>(p.out) + static_cast<std::int64_t>(blockIdx.z) * p.len_q * out_row +
               static_cast<std::int64_t>(blockIdx.y) * p.head_dim;
#pragma unroll
  for (int r = 0; r < 4; ++r) {
    float total = l[r];
#pragma unroll
    for (int lane_mask = 1; lane_mask < 16; lane_mask *= 2) total += __shfl_xor_sync(0xffffffffu, total, lane_mask);
    const int row = m0 + 4 * rg + r;
    if (row >= p.len_q) continue;
#pragma unroll
    for (int i = 0; i < kCols; ++i) {
      const int col = cg + 16 * i;
      if (col < p.head_dim) out[row * out_row + col] = o[r][i] / total;
    }
  }
}

// ---- launch ----

template <typename Kernel>
void launch(Kernel kernel, int smem_bytes, int block_rows, Params p, std::int64_t batch, std::int64_t out_sb,
            std::size_t elem, cudaStream_t stream) {
  if (smem_bytes > 48 * 1024) {  // above the static limit: opt in (every sm_80+ GPU has at least 99 KB per block)
    if (const cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem_bytes);
        err != cudaSuccess) {
      throw std::runtime_error(std::string("attention_cuda: cudaFuncSetAttribute failed: ") + cudaGetErrorString(err));
    }
  }
  const unsigned tiles_q = static_cast<unsigned>((p.len_q + block_rows - 1) / block_rows);
  // gridDim.z is limited to 65535: larger batches go in slices, their pointers advanced by whole batch items.
  for (std::int64_t b0 = 0; b0 < batch; b0 += kMaxGridYZ) {
    Params slice = p;
    slice.q = static_cast<const char*>(p.q) + b0 * p.q_sb * static_cast<std::int64_t>(elem);
    slice.k = static_cast<const char*>(p.k) + b0 * p.k_sb * static_cast<std::int64_t>(elem);
    slice.v = static_cast<const char*>(p.v) + b0 * p.v_sb * static_cast<std::int64_t>(elem);
    slice.out = static_cast<char*>(p.out) + b0 * out_sb * static_cast<std::int64_t>(elem);
    const dim3 grid(tiles_q, static_cast<unsigned>(p.heads),
                    static_cast<unsigned>(std::min<std::int64_t>(batch - b0, kMaxGridYZ)));
    kernel<<<grid, kThreads, smem_bytes, stream>>>(slice);
  }
}

// Instantiates `Body::template run<kD>()` for the head dimension padded up to the next supported tile width.
template <typename Body> void dispatch_head_dim(int head_dim, Body body) {
  if (head_dim <= 32) {
    body.template run<32>();
  } else if (head_dim <= 48) {
    body.template run<48>();
  } else if (head_dim <= 64) {
    body.template run<64>();
  } else if (head_dim <= 80) {
    body.template run<80>();
  } else if (head_dim <= 96) {
    body.template run<96>();
  } else {
    body.template run<128>();
  }
}

template <typename T> struct HalfLaunch {
  Params p;
  std::int64_t batch, out_sb;
  cudaStream_t stream;
  template <int kD> void run() const {
    launch(attention_half<T, kD>, half_smem_bytes<kD>(), kHalfM, p, batch, out_sb, sizeof(T), stream);
  }
};

struct F32Launch {
  Params p;
  std::int64_t batch, out_sb;
  cudaStream_t stream;
  template <int kD> void run() const {
    launch(attention_f32<kD>, f32_smem_bytes<kD>(), kF32M, p, batch, out_sb, sizeof(float), stream);
  }
};

void require(bool ok, const std::string& what) {
  if (!ok) throw std::invalid_argument("attention_cuda: " + what);
}

}  // namespace

void attention_cuda(std::uintptr_t out, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::int64_t batch,
                    std::int64_t heads, std::int64_t len_q, std::int64_t len_k, std::int64_t head_dim,
                    std::int64_t q_stride_b, std::int64_t q_stride_h, std::int64_t q_stride_l,
                    std::int64_t k_stride_b, std::int64_t k_stride_h, std::int64_t k_stride_l,
                    std::int64_t v_stride_b, std::int64_t v_stride_h, std::int64_t v_stride_l, double scale,
                    const std::string& dtype, std::uintptr_t stream) {
  const bool is_f32 = dtype == "float32";
  require(is_f32 || dtype == "float16" || dtype == "bfloat16",
          "dtype must be float16, bfloat16 or float32, got '" + dtype + "'");
  require(batch >= 0 && heads >= 0 && len_q >= 0 && len_k >= 0, "sizes must be non-negative");
  require(head_dim >= 16 && head_dim <= 128 && head_dim % 8 == 0,
          "head_dim must be a multiple of 8 in [16, 128], got " + std::to_string(head_dim));
  // Rows are indexed in int, and a tile past the last row (n0 + 64) must not overflow it.
  require(len_q <= (1 << 30) && len_k <= (1 << 30), "len_q and len_k must be at most 2**30");
  require(heads <= kMaxGridYZ, "at most 65535 heads");
  if (batch == 0 || heads == 0 || len_q == 0) return;  // nothing to write; a zero-block launch is an error
  require(len_k >= 1, "len_k must be >= 1 (the output of an empty softmax is the caller's to define)");
  const std::int64_t vec = is_f32 ? 4 : 8;  // elements per 16-byte chunk
  for (const std::uintptr_t ptr : {out, q, k, v}) {
    require(ptr != 0 && ptr % 16 == 0, "pointers must be 16-byte aligned");
  }
  for (const std::int64_t s : {q_stride_b, q_stride_h, q_stride_l, k_stride_b, k_stride_h, k_stride_l, v_stride_b,
                               v_stride_h, v_stride_l}) {
    require(s >= 0 && s % vec == 0, "strides must be non-negative multiples of 16 bytes");
  }

  Params p{};
  p.q = reinterpret_cast<const void*>(q);
  p.k = reinterpret_cast<const void*>(k);
  p.v = reinterpret_cast<const void*>(v);
  p.out = reinterpret_cast<void*>(out);
  p.q_sb = q_stride_b, p.q_sh = q_stride_h, p.q_sl = q_stride_l;
  p.k_sb = k_stride_b, p.k_sh = k_stride_h, p.k_sl = k_stride_l;
  p.v_sb = v_stride_b, p.v_sh = v_stride_h, p.v_sl = v_stride_l;
  p.heads = static_cast<int>(heads), p.len_q = static_cast<int>(len_q), p.len_k = static_cast<int>(len_k);
  p.head_dim = static_cast<int>(head_dim);
  const std::int64_t out_sb = heads * len_q * head_dim;
  auto* st = reinterpret_cast<cudaStream_t>(stream);
  if (is_f32) {
    p.scale = static_cast<float>(scale);
    dispatch_head_dim(p.head_dim, F32Launch{p, batch, out_sb, st});
  } else {
    p.scale = static_cast<float>(scale) * kLog2e;
    if (dtype == "float16") {
      dispatch_head_dim(p.head_dim, HalfLaunch<__half>{p, batch, out_sb, st});
    } else {
      dispatch_head_dim(p.head_dim, HalfLaunch<__nv_bfloat16>{p, batch, out_sb, st});
    }
  }
  // Launch-configuration errors only; asynchronous faults surface at the caller's next synchronization.
  if (const cudaError_t err = cudaGetLastError(); err != cudaSuccess) {
    throw std::runtime_error(std::string("attention_cuda: kernel launch failed: ") + cudaGetErrorString(err));
  }
}

}  // namespace blitzdiff
