// Element loads and stores shared by the CUDA kernels: half types are read as float and computed in float32 (Acc),
// then rounded once to nearest on store; float32 and float64 compute in their own precision.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace blitzdiff {

template <typename T> struct Acc { using type = float; };
template <> struct Acc<double> { using type = double; };

__device__ inline float load(const __half* p, std::int64_t i) { return __half2float(p[i]); }
__device__ inline float load(const __nv_bfloat16* p, std::int64_t i) { return __bfloat162float(p[i]); }
__device__ inline float load(const float* p, std::int64_t i) { return p[i]; }
__device__ inline double load(const double* p, std::int64_t i) { return p[i]; }

__device__ inline void store(__half* p, std::int64_t i, float v) { p[i] = __float2half_rn(v); }
__device__ inline void store(__nv_bfloat16* p, std::int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }
__device__ inline void store(float* p, std::int64_t i, float v) { p[i] = v; }
__device__ inline void store(double* p, std::int64_t i, double v) { p[i] = v; }

}  // namespace blitzdiff
