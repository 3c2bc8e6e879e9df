// CPU kernel of the direct NHWC convolution; see conv2d.h for the contract.
//
// The output is cut into tiles of up to kTilePixels consecutive pixels of one output row times up to kTileBlocks
// blocks of 16 output channels, each computed by tile_kernel.h's register-tiled micro-kernel over the kernel window
// and the input channels (the usual direct-convolution micro-kernel; no im2col buffer).
// Zero padding: the input is first copied into a zero-bordered scratch image, so the tile loop has no bounds tests.
#include <algorithm>
#include <stdexcept>
#include <string>
#include <memory>

#include "conv2d.h"
#include "parallel.h"
#include "tile_kernel.h"

namespace blitzdiff {
namespace {

// x [height, width, channels] -> scratch [height + 2 ph, width + 2 pw, channels] with zero borders.
void pad_image(const float* x, std::int64_t height, std::int64_t width, std::int64_t channels, std::int64_t pad_h,
               std::int64_t pad_w, float* padded) {
  const std::int64_t padded_row = (width + 2 * pad_w) * channels;
  std::fill(padded, padded + pad_h * padded_row, 0.0f);
  for (std::int64_t y = 0; y < height; ++y) {
    float* row = padded + (y + pad_h) * padded_row;
    std::fill(row, row + pad_w * channels, 0.0f);
    std::copy(x + y * width * channels, x + (y + 1) * width * channels, row + pad_w * channels);
    std::fill(row + (pad_w + width) * channels, row + padded_row, 0.0f);
  }
  std::fill(padded + (height + pad_h) * padded_row, padded + (height + 2 * pad_h) * padded_row, 0.0f);
}

std::int64_t out_size(std::int64_t size, std::int64_t kernel, std::int64_t stride, std::int64_t pad) {
  return (size + 2 * pad - kernel) / stride + 1;
}

void check_positive(const char* what, std::int64_t value) {
  if (value < 1) {
    throw std::invalid_argument(std::string("conv2d_nhwc: ") + what + " must be >= 1, got " + std::to_string(value));
  }
}

}  // namespace

Conv2dNhwc::Conv2dNhwc(std::int64_t in_channels_, std::int64_t out_channels_, std::int64_t kernel_h_,
                       std::int64_t kernel_w_, std::int64_t stride_h_, std::int64_t stride_w_, std::int64_t pad_h_,
                       std::int64_t pad_w_, std::uintptr_t packed_weight_)
    : in_channels(in_channels_), out_channels(out_channels_), kernel_h(kernel_h_), kernel_w(kernel_w_),
      stride_h(stride_h_), stride_w(stride_w_), pad_h(pad_h_), pad_w(pad_w_), packed_weight(packed_weight_) {
  check_positive("in_channels", in_channels);
  check_positive("out_channels", out_channels);
  check_positive("kernel_h", kernel_h);
  check_positive("kernel_w", kernel_w);
  check_positive("stride_h", stride_h);
  check_positive("stride_w", stride_w);
  if (pad_h < 0 || pad_w < 0) {
    throw std::invalid_argument("conv2d_nhwc: padding must be >= 0, got " + std::to_string(pad_h) + ", " +
                                std::to_string(pad_w));
  }
  if (packed_weight == 0) {
    throw std::invalid_argument("conv2d_nhwc: packed_weight must be a non-null pointer");
  }
}

void Conv2dNhwc::run(std::uintptr_t out, std::uintptr_t x, std::uintptr_t bias, std::int64_t batch,
                     std::int64_t height, std::int64_t width, std::int64_t threads, bool generic) const {
  check_threads("conv2d_nhwc", threads);
  if (batch < 0) throw std::invalid_argument("conv2d_nhwc: batch must be >= 0, got " + std::to_string(batch));
  check_positive("height", height);
  check_positive("width", width);
  if (height + 2 * pad_h < kernel_h || width + 2 * pad_w < kernel_w) {
    throw std::invalid_argument("conv2d_nhwc: the padded input (" + std::to_string(height + 2 * pad_h) + "x" +
                                std::to_string(width + 2 * pad_w) + ") is smaller than the kernel (" +
                                std::to_string(kernel_h) + "x" + std::to_string(kernel_w) + ")");
  }
  if (batch == 0) return;
  if (out == 0 || x == 0) throw std::invalid_argument("conv2d_nhwc: out and x must be non-null pointers");

  const std::int64_t out_h = out_size(height, kernel_h, stride_h, pad_h);
  const std::int64_t out_w = out_size(width, kernel_w, stride_w, pad_w);
  const std::int64_t padded_h = height + 2 * pad_h, padded_w = width + 2 * pad_w;
  const auto* input = reinterpret_cast<const float*>(x);
  std::unique_ptr<float[]> scratch;  // the zero-bordered copy of every image, where there is padding
  if (pad_h > 0 || pad_w > 0) {
    scratch.reset(new float[static_cast<std::size_t>(batch * padded_h * padded_w * in_channels)]);
    for (std::int64_t b = 0; b < batch; ++b) {
      pad_image(input + b * height * width * in_channels, height, width, in_channels, pad_h, pad_w,
                scratch.get() + b * padded_h * padded_w * in_channels);
    }
    input = scratch.get();
  }

  const std::int64_t blocks = (out_channels + kLanes - 1) / kLanes;
  const std::int64_t x_tiles = (out_w + kTilePixels - 1) / kTilePixels;
  const std::int64_t block_groups = (blocks + kTileBlocks - 1) / kTileBlocks;
  const std::int64_t items = batch * out_h * x_tiles * block_groups;  // tiles, block groups innermost
  const std::int64_t macs_per_item = kTilePixels * kTileBlocks * kLanes * kernel_h * kernel_w * in_channels;
  const bool avx512 = !generic && cpu_has_avx512();
  const auto* weight = reinterpret_cast<const float*>(packed_weight);
  const auto* bias_values = reinterpret_cast<const float*>(bias);
  auto* output = reinterpret_cast<float*>(out);

  Tile base{};
  base.pixel_step = stride_w * in_channels;
  base.row_step = padded_w * in_channels;
  base.block_step = kernel_h * kernel_w * in_channels * kLanes;
  base.out_step = out_channels;
  base.in_channels = in_channels;
  base.kernel_h = static_cast<int>(kernel_h);
  base.kernel_w = static_cast<int>(kernel_w);

  parallel_ranges(items, min_items_per_thread(macs_per_item), threads,
                  [&](std::int64_t first, std::int64_t last) {
    for (std::int64_t item = first; item < last; ++item) {
      const std::int64_t group = item % block_groups;
      const std::int64_t tile = (item / block_groups) % x_tiles;
      const std::int64_t oy = (item / (block_groups * x_tiles)) % out_h;
      const std::int64_t b = item / (block_groups * x_tiles * out_h);
      const std::int64_t ox = tile * kTilePixels;
      const std::int64_t block = group * kTileBlocks;
      const int pixels = static_cast<int>(std::min<std::int64_t>(kTilePixels, out_w - ox));
      const int tile_blocks = static_cast<int>(std::min<std::int64_t>(kTileBlocks, blocks - block));
      Tile t = base;
      t.x = input + ((b * padded_h + oy * stride_h) * padded_w + ox * stride_w) * in_channels;
      t.w = weight + block * base.block_step;
      t.bias = bias_values == nullptr ? nullptr : bias_values + block * kLanes;
      t.out = output + ((b * out_h + oy) * out_w + ox) * out_channels + block * kLanes;
      const std::int64_t last_block = block + tile_blocks - 1;
      t.last_lanes = static_cast<int>(std::min<std::int64_t>(kLanes, out_channels - last_block * kLanes));
      run_tile(t, pixels, tile_blocks, avx512);
    }
  });
}

std::string conv2d_nhwc_isa() { return cpu_has_avx512() ? "avx512f" : "generic"; }

}  // namespace blitzdiff
