// CPU kernel of the Winograd F(m x m, 3x3) convolutions, m = 2 or 4; see conv2d_winograd.h for the contract.
//
// Work is split into chunks of output tiles (m x m pixels each). Per chunk, on one thread: the input transform
// writes V[p, tile, c] ((m + 2)^2 positions), the micro-kernel computes M[p, tile, o] = sum_c V[p, tile, c]
// U[p, c, o], and the output transform writes out = A^T M A + bias. A chunk's V and M stay under ~256 KiB, in L2.
// Zero padding: a tile whose input patch reaches past the image has its patch copied, zeros included, first.
#include "conv2d_winograd.h"

#include <algorithm>
#include <memory>
#include <stdexcept>
#include <string>

#include "parallel.h"
#include "tile_kernel.h"
#include "vectorize.h"

namespace blitzdiff {
namespace {

constexpr std::int64_t kChunkFloats = std::int64_t{1} << 16;       // V + M of a chunk: 256 KiB

// One line of a tile through B^T (input: N values -> N) or A^T (output: N values -> M), for T = float (the portable
// loop, one channel) or a 16-float vector (the AVX-512 loop, 16 channels): the same operations in the same order,
// so the same bits. Coefficients as in conv2d_winograd.h.
template <int M>
struct Lines;

template <>
struct Lines<2> {
  static constexpr int N = 4;
  template <typename T>
  BLITZDIFF_INLINE static void input(const T* d, T* r) {
    r[0] = d[0] - d[2];
    r[1] = d[1] + d[2];
    r[2] = d[2] - d[1];
    r[3] = d[1] - d[3];
  }
  template <typename T>
  BLITZDIFF_INLINE static void output(const T* m, T* y) {
    y[0] = (m[0] + m[1]) + m[2];
    y[1] = (m[1] - m[2]) - m[3];
  }
};

template <>
struct Lines<4> {
  static constexpr int N = 6;
  template <typename T>
  BLITZDIFF_INLINE static void input(const T* d, T* r) {
    r[0] = (4.0f * d[0] - 5.0f * d[2]) + d[4];
    r[1] = (d[3] + d[4]) - 4.0f * (d[1] + d[2]);
    r[2] = (d[4] - d[3]) + 4.0f * (d[1] - d[2]);
    r[3] = (d[4] - d[2]) - 2.0f * (d[1] - d[3]);
    r[4] = (d[4] - d[2]) + 2.0f * (d[1] - d[3]);
    r[5] = (4.0f * d[1] - 5.0f * d[3]) + d[5];
  }
  template <typename T>
  BLITZDIFF_INLINE static void output(const T* m, T* y) {
    const T sum12 = m[1] + m[2], diff12 = m[1] - m[2], sum34 = m[3] + m[4], diff34 = m[3] - m[4];
    y[0] = (m[0] + sum12) + sum34;
    y[1] = diff12 + 2.0f * diff34;
    y[2] = sum12 + 4.0f * sum34;
    y[3] = (diff12 + 8.0f * diff34) + m[5];
  }
};

// d [N][N] -> v [N][N] = B^T d B (columns first, then rows), and m [N][N] -> y [M][M] = A^T m A.
template <int M, typename T>
BLITZDIFF_INLINE void tile_input(T (&d)[M + 2][M + 2], T (&v)[M + 2][M + 2]) {
  constexpr int N = M + 2;
  T t[N][N], line[N], done[N];
  for (int j = 0; j < N; ++j) {
    for (int k = 0; k < N; ++k) line[k] = d[k][j];
    Lines<M>::input(line, done);
    for (int i = 0; i < N; ++i) t[i][j] = done[i];
  }
  for (int i = 0; i < N; ++i) Lines<M>::input(t[i], v[i]);
}

template <int M, typename T>
BLITZDIFF_INLINE void tile_output(T (&m)[M + 2][M + 2], T (&y)[M][M]) {
  constexpr int N = M + 2;
  T t[M][N], line[N], done[M];
  for (int j = 0; j < N; ++j) {
    for (int k = 0; k < N; ++k) line[k] = m[k][j];
    Lines<M>::output(line, done);
    for (int i = 0; i < M; ++i) t[i][j] = done[i];
  }
  for (int i = 0; i < M; ++i) Lines<M>::output(t[i], y[i]);
}

// The transforms of one tile, every channel:
//   input:  V[p * pos_step + c] = (B^T d B)[p] with d[i][j] at patch[(i * row + j) * channels + c];
//   output: out[(i * row + j) * channels + o] = (A^T M A)[i][j] + bias[o] for i < rows, j < cols, with M[p] at
//           m[p * pos_step + o].
template <int M>
void input_transform_generic(const float* patch, std::int64_t row, std::int64_t channels, float* v,
                             std::int64_t pos_step) {
  constexpr int N = M + 2;
  for (std::int64_t c = 0; c < channels; ++c) {
    float d[N][N], w[N][N];
    for (int i = 0; i < N; ++i) {
      for (int j = 0; j < N; ++j) d[i][j] = patch[(i * row + j) * channels + c];
    }
    tile_input<M>(d, w);
    for (int p = 0; p < N * N; ++p) v[p * pos_step + c] = w[p / N][p % N];
  }
}

template <int M>
void output_transform_generic(const float* m, std::int64_t pos_step, const float* bias, std::int64_t channels,
                              float* out, std::int64_t row, int rows, int cols) {
  constexpr int N = M + 2;
  for (std::int64_t o = 0; o < channels; ++o) {
    float s[N][N], y[M][M];
    for (int p = 0; p < N * N; ++p) s[p / N][p % N] = m[p * pos_step + o];
    tile_output<M>(s, y);
    const float b = bias == nullptr ? 0.0f : bias[o];
    for (int i = 0; i < rows; ++i) {
      for (int j = 0; j < cols; ++j) out[(i * row + j) * channels + o] = y[i][j] + b;
    }
  }
}

#ifdef BLITZDIFF_HAVE_AVX512_TILE
inline __mmask16 lanes_from(std::int64_t left) {
  return static_cast<__mmask16>(left >= kLanes ? 0xFFFFu : (1u << left) - 1u);
}

template <int M>
__attribute__((target("avx512f"))) void input_transform_avx512(const float* patch, std::int64_t row,
                                                                std::int64_t channels, float* v,
                                                                std::int64_t pos_step) {
  constexpr int N = M + 2;
  for (std::int64_t c = 0; c < channels; c += kLanes) {
    const __mmask16 lanes = lanes_from(channels - c);
    __m512 d[N][N], w[N][N];
    for (int i = 0; i < N; ++i) {
      for (int j = 0; j < N; ++j) d[i][j] = _mm512_maskz_loadu_ps(lanes, patch + (i * row + j) * channels + c);
    }
    tile_input<M>(d, w);
    for (int p = 0; p < N * N; ++p) _mm512_mask_storeu_ps(v + p * pos_step + c, lanes, w[p / N][p % N]);
  }
}

template <int M>
__attribute__((target("avx512f"))) void output_transform_avx512(const float* m, std::int64_t pos_step,
                                                                 const float* bias, std::int64_t channels, float* out,
                                                                 std::int64_t row, int rows, int cols) {
  constexpr int N = M + 2;
  for (std::int64_t o = 0; o < channels; o += kLanes) {
    const __mmask16 lanes = lanes_from(channels - o);
    __m512 s[N][N], y[M][M];
    for (int p = 0; p < N * N; ++p) s[p / N][p % N] = _mm512_maskz_loadu_ps(lanes, m + p * pos_step + o);
    tile_output<M>(s, y);
    const __m512 b = bias == nullptr ? _mm512_setzero_ps() : _mm512_maskz_loadu_ps(lanes, bias + o);
    for (int i = 0; i < rows; ++i) {
      for (int j = 0; j < cols; ++j) {
        _mm512_mask_storeu_ps(out + (i * row + j) * channels + o, lanes, _mm512_add_ps(y[i][j], b));
      }
    }
  }
}
#endif

template <int M>
void input_transform(const float* patch, std::int64_t row, std::int64_t channels, float* v, std::int64_t pos_step,
                     bool avx512) {
#ifdef BLITZDIFF_HAVE_AVX512_TILE
  if (avx512) return input_transform_avx512<M>(patch, row, channels, v, pos_step);
#endif
  (void)avx512;
  input_transform_generic<M>(patch, row, channels, v, pos_step);
}

template <int M>
void output_transform(const float* m, std::int64_t pos_step, const float* bias, std::int64_t channels, float* out,
                      std::int64_t row, int rows, int cols, bool avx512) {
#ifdef BLITZDIFF_HAVE_AVX512_TILE
  if (avx512) return output_transform_avx512<M>(m, pos_step, bias, channels, out, row, rows, cols);
#endif
  (void)avx512;
  output_transform_generic<M>(m, pos_step, bias, channels, out, row, rows, cols);
}

// Sizes and pointers of one call (validated by Conv2dWinograd::run).
struct Call {
  const float* input;
  const float* weight;  // packed [positions, blocks, in, 16]
  const float* bias;    // or null
  float* output;
  std::int64_t batch, height, width, out_h, out_w, in_channels, out_channels, pad_h, pad_w, threads;
  bool avx512;
};

template <int M>
void run_tiles(const Call& call) {
  constexpr int N = M + 2;
  constexpr std::int64_t positions = N * N;
  const std::int64_t cin = call.in_channels, cout = call.out_channels;
  const std::int64_t tiles_h = (call.out_h + M - 1) / M, tiles_w = (call.out_w + M - 1) / M;
  const std::int64_t tiles = call.batch * tiles_h * tiles_w;
  // a multiple of the micro-kernel's rows, small enough for L2 and for every thread to get one; a tile's result does
  // not depend on its chunk, so neither do the bits
  const std::int64_t l2_chunk = kChunkFloats / (positions * (cin + cout)) / kTilePixels * kTilePixels;
  const std::int64_t per_thread = (tiles + call.threads - 1) / call.threads;
  const std::int64_t chunk = std::max<std::int64_t>(
      kTilePixels, std::min(l2_chunk, (per_thread + kTilePixels - 1) / kTilePixels * kTilePixels));
  const std::int64_t chunks = (tiles + chunk - 1) / chunk;
  const std::int64_t blocks = (cout + kLanes - 1) / kLanes;
  const std::int64_t macs_per_chunk = positions * chunk * cin * cout;

  Tile base{};
  base.pixel_step = cin;  // a row of the product: one tile's transformed channels
  base.row_step = 0;
  base.block_step = cin * kLanes;
  base.out_step = cout;
  base.in_channels = cin;
  base.kernel_h = base.kernel_w = 1;

  parallel_ranges(chunks, min_items_per_thread(macs_per_chunk), call.threads,
                  [&](std::int64_t first, std::int64_t last) {
    // per thread, not zeroed: every element read is written first
    std::unique_ptr<float[]> v(new float[static_cast<std::size_t>(positions * chunk * cin)]);
    std::unique_ptr<float[]> m(new float[static_cast<std::size_t>(positions * chunk * cout)]);
    std::unique_ptr<float[]> edge(new float[static_cast<std::size_t>(positions * cin)]);
    for (std::int64_t index = first; index < last; ++index) {
      const std::int64_t tile0 = index * chunk, count = std::min(chunk, tiles - tile0);
      for (std::int64_t k = 0; k < count; ++k) {
        const std::int64_t tile = tile0 + k, tx = tile % tiles_w, ty = (tile / tiles_w) % tiles_h;
        const float* image = call.input + tile / (tiles_w * tiles_h) * call.height * call.width * cin;
        // the tile's N x N input patch starts at (top, left); inside the image it is read in place, else copied
        // with the zero padding into `edge`
        const std::int64_t top = M * ty - call.pad_h, left = M * tx - call.pad_w;
        if (top >= 0 && left >= 0 && top + N <= call.height && left + N <= call.width) {
          input_transform<M>(image + (top * call.width + left) * cin, call.width, cin, v.get() + k * cin,
                             chunk * cin, call.avx512);
          continue;
        }
        for (std::int64_t i = 0; i < N; ++i) {
          for (std::int64_t j = 0; j < N; ++j) {
            float* to = edge.get() + (i * N + j) * cin;
            const std::int64_t y = top + i, x = left + j;
            if (y >= 0 && y < call.height && x >= 0 && x < call.width) {
              std::copy(image + (y * call.width + x) * cin, image + (y * call.width + x + 1) * cin, to);
            } else {
              std::fill(to, to + cin, 0.0f);
            }
          }
        }
        input_transform<M>(edge.get(), N, cin, v.get() + k * cin, chunk * cin, call.avx512);
      }
      for (std::int64_t p = 0; p < positions; ++p) {
        for (std::int64_t row = 0; row < count; row += kTilePixels) {
          for (std::int64_t block = 0; block < blocks; block += kTileBlocks) {
            const int tile_blocks = static_cast<int>(std::min<std::int64_t>(kTileBlocks, blocks - block));
            Tile t = base;
            t.x = v.get() + (p * chunk + row) * cin;
            t.w = call.weight + (p * blocks + block) * cin * kLanes;
            t.bias = nullptr;
            t.out = m.get() + (p * chunk + row) * cout + block * kLanes;
            t.last_lanes = static_cast<int>(std::min<std::int64_t>(kLanes, cout - (block + tile_blocks - 1) * kLanes));
            run_tile(t, static_cast<int>(std::min<std::int64_t>(kTilePixels, count - row)), tile_blocks, call.avx512);
          }
        }
      }
      for (std::int64_t k = 0; k < count; ++k) {
        const std::int64_t tile = tile0 + k, tx = tile % tiles_w, ty = (tile / tiles_w) % tiles_h;
        const std::int64_t b = tile / (tiles_w * tiles_h);
        output_transform<M>(m.get() + k * cout, chunk * cout, call.bias, cout,
                            call.output + ((b * call.out_h + M * ty) * call.out_w + M * tx) * cout, call.out_w,
                            static_cast<int>(std::min<std::int64_t>(M, call.out_h - M * ty)),
                            static_cast<int>(std::min<std::int64_t>(M, call.out_w - M * tx)), call.avx512);
      }
    }
  });
}

}  // namespace

Conv2dWinograd::Conv2dWinograd(std::int64_t in_channels_, std::int64_t out_channels_, std::int64_t pad_h_,
                               std::int64_t pad_w_, std::uintptr_t packed_weight_, std::int64_t tile_)
    : in_channels(in_channels_), out_channels(out_channels_), pad_h(pad_h_), pad_w(pad_w_),
      packed_weight(packed_weight_), tile(tile_) {
  if (in_channels < 1 || out_channels < 1) {
    throw std::invalid_argument("conv2d_winograd: in_channels and out_channels must be >= 1, got " +
                                std::to_string(in_channels) + ", " + std::to_string(out_channels));
  }
  if (pad_h < 0 || pad_w < 0) {
    throw std::invalid_argument("conv2d_winograd: padding must be >= 0, got " + std::to_string(pad_h) + ", " +
                                std::to_string(pad_w));
  }
  if (tile != 2 && tile != 4) {
    throw std::invalid_argument("conv2d_winograd: tile must be 2 or 4, got " + std::to_string(tile));
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
  const Call call{reinterpret_cast<const float*>(x), reinterpret_cast<const float*>(packed_weight),
                  reinterpret_cast<const float*>(bias), reinterpret_cast<float*>(out), batch, height, width, out_h,
                  out_w, in_channels, out_channels, pad_h, pad_w, threads, !generic && cpu_has_avx512()};
  if (tile == 4) {
    run_tiles<4>(call);
  } else {
    run_tiles<2>(call);
  }
}

}  // namespace blitzdiff
