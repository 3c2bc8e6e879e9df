// GroupNorm with a diffusion UNet's glue fused in: the native twin of the PyTorch spec
// blitzdiff.kernels.group_norm.group_norm_ref.
//
// x, out, residual: [batch, channels, spatial] (spatial = H*W, or any flattened spatial size), either
// channels-first ("NCS": contiguous [B, C, S]) or channels-last ("NSC": contiguous [B, S, C], what PyTorch's
// channels_last stores); all three share the layout and the dtype. For each sample b and group g (channels
// g*C/G .. (g+1)*C/G - 1, over all of spatial):
//   y = (x - mean) * rstd            mean, var: biased, of the group; rstd = 1 / sqrt(var + eps)
//   y = y * weight[c] + bias[c]      (each optional)
//   y = y * (1 + scale[b, c]) + shift[b, c]   (AdaGN; each optional)
//   y = silu(y) (optional), then y + residual (optional); out = y rounded once to the dtype.
// Statistics are moments (count, mean, sum of squared deviations) of chunks, computed in float32 (float64 for
// float64 data, CUDA only) without a one-pass E[x^2] - mean^2, so a large mean does not cancel the variance, and
// merged in a fixed order (Chan et al.), so results are bitwise repeatable. The affine and AdaGN terms are folded
// per (b, c) into y = (x - mean) * a + k (in float64, rounded once) before the element pass.
//
// Pointers arrive as integers (Tensor.data_ptr()) so the module never links to torch; 0 means "absent" for
// weight, bias, scale, shift and residual. weight, bias: contiguous [C]; scale, shift: [B, C] with unit channel
// stride and the given batch strides; all four share `param_dtype`, which is `dtype` or its float32 (float64 for
// float64) accumulation type. dtype: "float32" or "bfloat16" on the CPU; "float16", "bfloat16", "float32" or
// "float64" on CUDA. `out` must not overlap an input. Bad arguments throw std::invalid_argument (ValueError in
// Python), CUDA failures std::runtime_error.
#pragma once

#include <cstdint>
#include <string>

namespace blitzdiff {

// `threads`: the most CPU threads to use (the Python side passes torch.get_num_threads()); fewer run when the
// tensor is small. The result does not depend on the thread count.
void group_norm_cpu(std::uintptr_t out, std::uintptr_t x, std::uintptr_t weight, std::uintptr_t bias,
                    std::uintptr_t scale, std::int64_t scale_stride, std::uintptr_t shift, std::int64_t shift_stride,
                    std::uintptr_t residual, std::int64_t batch, std::int64_t channels, std::int64_t spatial,
                    std::int64_t groups, double eps, bool channels_last, bool silu, const std::string& dtype,
                    const std::string& param_dtype, std::int64_t threads);

#ifdef BLITZDIFF_WITH_CUDA
// Bytes of device scratch memory group_norm_cuda needs for these sizes (per-chunk moments and per-(b, c)
// coefficients); the caller allocates it (torch's caching allocator, so CUDA graph capture works).
std::int64_t group_norm_cuda_workspace(std::int64_t batch, std::int64_t channels, std::int64_t spatial,
                                       std::int64_t groups, const std::string& dtype);

// Three kernels (chunk moments, per-channel coefficients, the element pass) enqueued on `stream` (a cudaStream_t
// as an integer; 0 is the legacy default stream) of the device whose context is current; no synchronization, so
// it is safe inside CUDA graph capture. Needs channels * spatial < 2^31 (32-bit indices within a sample).
void group_norm_cuda(std::uintptr_t out, std::uintptr_t x, std::uintptr_t weight, std::uintptr_t bias,
                     std::uintptr_t scale, std::int64_t scale_stride, std::uintptr_t shift, std::int64_t shift_stride,
                     std::uintptr_t residual, std::int64_t batch, std::int64_t channels, std::int64_t spatial,
                     std::int64_t groups, double eps, bool channels_last, bool silu, const std::string& dtype,
                     const std::string& param_dtype, std::uintptr_t workspace, std::int64_t workspace_bytes,
                     std::uintptr_t stream);
#endif

// Throws std::invalid_argument unless the sizes are non-negative, groups >= 1 divides channels, and, when the
// tensor is not empty, out and x are non-null.
void check_group_norm_args(std::uintptr_t out, std::uintptr_t x, std::int64_t batch, std::int64_t channels,
                           std::int64_t spatial, std::int64_t groups);

}  // namespace blitzdiff
