// Per-sample, counter-based Gaussian noise (ARCHITECTURE.md contract 4): the native twin of the PyTorch spec
// blitzdiff.kernels.gaussian_noise.gaussian_noise_ref (which blitzdiff.engine.noise.gaussian runs).
//
// Row b of out [batch, count] depends only on (seeds[b], stream):
//   key1 = mix32(lo32(seed) ^ mix32(stream)),  key2 = mix32(hi32(seed) ^ mix32(key1 + 0x9E3779B9))
//   bits(c) = mix32(mix32(c ^ key1) ^ key2)                     for the counters c = 0 .. 2*count-1
//   u(c) = ((bits(c) >> 8) + 0.5) * 2^-24                      24-bit uniforms in (0, 1), float32
//   out[b, k] = sqrt(-2 log u(k)) * cos(float32(2 pi) * u(count + k))    Box-Muller, cosine branch, float32
// then rounded once to the output dtype. The integer part is bit-identical to the spec (which emulates this
// wrapping uint32 arithmetic in int64); log and cos come from <cmath> (CPU) or CUDA's libdevice, so a float32
// result may differ from PyTorch's by an ulp or two.
//
// Pointers arrive as integers (Tensor.data_ptr()) so the module never links to torch. seeds: int64 [batch];
// out: contiguous [batch, count] of `dtype` ("float32", "float64"; the CUDA kernel also takes "float16" and
// "bfloat16"); 0 <= stream < 2^31. Bad arguments throw std::invalid_argument (ValueError in Python), CUDA
// failures std::runtime_error.
#pragma once

#include <cstdint>
#include <string>

#if defined(__CUDACC__)
#define BLITZDIFF_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define BLITZDIFF_HOST_DEVICE inline
#endif

namespace blitzdiff {

// 'lowbias32' (C. Wellons, hash-prospector): a bijective 32-bit avalanche hash; uint32 arithmetic wraps.
// `high` is xor-ed into the first xorshift: it carries counter bits 32..47 the way the spec's 64-bit `x >> 16`
// does (zero for every counter below 2^32, i.e. for count < 2^31 elements per sample).
BLITZDIFF_HOST_DEVICE std::uint32_t mix32(std::uint32_t x, std::uint32_t high = 0) {
  x ^= (x >> 16) ^ high;
  x *= 0x21F0AAADu;
  x ^= x >> 15;
  x *= 0x735A2D97u;
  return x ^ (x >> 15);
}

struct NoiseKeys {
  std::uint32_t key1, key2;
};

BLITZDIFF_HOST_DEVICE NoiseKeys noise_keys(std::int64_t seed, std::uint32_t stream) {
  const auto bits = static_cast<std::uint64_t>(seed);  // two's complement, as the spec's `seeds & 0xFFFFFFFF`
  const std::uint32_t key1 = mix32(static_cast<std::uint32_t>(bits) ^ mix32(stream));
  const std::uint32_t key2 = mix32(static_cast<std::uint32_t>(bits >> 32) ^ mix32(key1 + 0x9E3779B9u));
  return {key1, key2};
}

// The spec's bits for one 64-bit counter.
BLITZDIFF_HOST_DEVICE std::uint32_t noise_bits(NoiseKeys keys, std::uint64_t counter) {
  const auto high = static_cast<std::uint32_t>(counter >> 32) << 16;
  return mix32(mix32(static_cast<std::uint32_t>(counter) ^ keys.key1, high) ^ keys.key2);
}

// Exact in float32 up to the one rounding of `+ 0.5` that the spec does too (bits >> 8 < 2^24 converts exactly;
// the scale is a power of two).
BLITZDIFF_HOST_DEVICE float bits_to_uniform(std::uint32_t bits) {
  return (static_cast<float>(static_cast<std::int32_t>(bits >> 8)) + 0.5f) * 0x1p-24f;
}

// float32(2 pi), the value PyTorch uses for the Python scalar `2.0 * math.pi` times a float32 tensor.
constexpr float kTwoPi = static_cast<float>(6.283185307179586476925286766559);

void gaussian_noise_cpu(std::uintptr_t out, std::uintptr_t seeds, std::int64_t batch, std::int64_t count,
                        std::int64_t stream, const std::string& dtype, std::int64_t threads);

// The raw hash: out int64 [batch, n] = bits(first + j) for j < n (for tests: exposes the integer part exactly).
void noise_bits_cpu(std::uintptr_t out, std::uintptr_t seeds, std::int64_t batch, std::int64_t stream,
                    std::int64_t first, std::int64_t n);

#ifdef BLITZDIFF_WITH_CUDA
// Enqueue on `cuda_stream` (a cudaStream_t as an integer; 0 is the legacy default stream) of the device whose
// context is current; seeds and out are device pointers. No synchronization, so it is safe in CUDA graph capture.
void gaussian_noise_cuda(std::uintptr_t out, std::uintptr_t seeds, std::int64_t batch, std::int64_t count,
                         std::int64_t stream, const std::string& dtype, std::uintptr_t cuda_stream);

void noise_bits_cuda(std::uintptr_t out, std::uintptr_t seeds, std::int64_t batch, std::int64_t stream,
                     std::int64_t first, std::int64_t n, std::uintptr_t cuda_stream);
#endif

// Throws std::invalid_argument unless batch, count >= 0, 0 <= stream < 2^31 and, when batch * count > 0, out and
// seeds are non-null.
void check_gaussian_noise_args(std::uintptr_t out, std::uintptr_t seeds, std::int64_t batch, std::int64_t count,
                               std::int64_t stream);

// As check_gaussian_noise_args for n counters, and 0 <= first, first + n <= 2^47 (past that the spec's int64
// emulation overflows).
void check_noise_bits_args(std::uintptr_t out, std::uintptr_t seeds, std::int64_t batch, std::int64_t stream,
                           std::int64_t first, std::int64_t n);

}  // namespace blitzdiff
