// Fused flash-attention forward (ARCHITECTURE.md contract 5): out = softmax(q k^T * scale) v, no mask.
//
// q: [batch, heads, len_q, head_dim], k and v: [batch, heads, len_k, head_dim], each given by a device pointer and
// its batch / head / row strides in elements (the head dimension is contiguous), so transposed views such as q from
// a [B, L, H, D] projection are read in place. out: a dense [batch, len_q, heads, head_dim] buffer (the layout the
// heads are merged back in, [B, L, H * D]) that overlaps no input. dtype: "float16" / "bfloat16" (tensor-core
// mma.sync, float32 accumulation and softmax) or "float32" (CUDA cores, float32 throughout). head_dim: a multiple
// of 8 in [16, 128]; len_q, len_k <= 2^30; len_k >= 1 unless the output is empty (batch, heads or len_q is 0).
// Every pointer and stride must be 16-byte aligned (strides a multiple of 8 elements for the half types, 4 for
// float32). Pointers arrive as integers (torch's Tensor.data_ptr()) so the module never links to torch.
// Bad arguments throw std::invalid_argument (ValueError in Python), CUDA failures std::runtime_error.
#pragma once

#include <cstdint>
#include <string>

namespace blitzdiff {

// The CPU kernel (csrc/attention_cpu.cpp), float32 only: the same operands and output layout, any head_dim >= 1 and
// any strides (unit head-dim stride), on up to `threads` threads (the same bits for any count); generic: the portable
// loop even where the AVX-512 one could run (for tests).
void attention_cpu(std::uintptr_t out, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::int64_t batch,
                   std::int64_t heads, std::int64_t len_q, std::int64_t len_k, std::int64_t head_dim,
                   std::int64_t q_stride_b, std::int64_t q_stride_h, std::int64_t q_stride_l,
                   std::int64_t k_stride_b, std::int64_t k_stride_h, std::int64_t k_stride_l,
                   std::int64_t v_stride_b, std::int64_t v_stride_h, std::int64_t v_stride_l, double scale,
                   std::int64_t threads, bool generic);

#ifdef BLITZDIFF_WITH_CUDA
// Enqueues the kernel on `stream` (a cudaStream_t as an integer; 0 is the legacy default stream) of the device
// whose context is current; does not synchronize, so it is safe inside CUDA graph capture.
void attention_cuda(std::uintptr_t out, std::uintptr_t q, std::uintptr_t k, std::uintptr_t v, std::int64_t batch,
                    std::int64_t heads, std::int64_t len_q, std::int64_t len_k, std::int64_t head_dim,
                    std::int64_t q_stride_b, std::int64_t q_stride_h, std::int64_t q_stride_l,
                    std::int64_t k_stride_b, std::int64_t k_stride_h, std::int64_t k_stride_l,
                    std::int64_t v_stride_b, std::int64_t v_stride_h, std::int64_t v_stride_l, double scale,
                    const std::string& dtype, std::uintptr_t stream);
#endif

}  // namespace blitzdiff
