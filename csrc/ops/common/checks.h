// Argument checks shared by the CPU and CUDA entry points: every op validates its inputs the
// same way on every device, with messages that name the argument and what was expected.
#pragma once
#include <ATen/ATen.h>
#include "ops/common/arith.h"

namespace carprune {

inline void check_same_device(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), "carprune: `", name, "` is on ", t.device(),
              " but the activations are on ", ref.device());
}

// Validates ablate_conv's arguments and returns the convolution geometry.
ConvGeom check_ablate_conv(const at::Tensor& a, const at::Tensor& weight, const at::Tensor& z,
                           const at::Tensor& scale, const at::Tensor& shift,
                           const at::Tensor& channels, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation);

// Validates ablate_conv_head's arguments (channel -1: nothing removed) and returns the geometry.
ConvGeom check_ablate_conv_head(const at::Tensor& a, const at::Tensor& weight, const at::Tensor& z,
                                const at::Tensor& scale, const at::Tensor& shift,
                                const at::Tensor& channels, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation,
                                const std::optional<at::Tensor>& residual,
                                const at::Tensor& fc_weight,
                                const std::optional<at::Tensor>& fc_bias);

// Validates class_correct_counts' arguments (label range is checked by the kernels' callers).
void check_class_correct_counts(const at::Tensor& logits, const at::Tensor& labels, int64_t topk);

}  // namespace carprune
