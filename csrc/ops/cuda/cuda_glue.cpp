// CUDA dispatch of the carprune ops: argument checks (shared with CPU), then the raw-pointer
// launchers on the current stream.
#include <c10/cuda/CUDAStream.h>  // not ATen/cuda/CUDAContext.h: it needs cuSPARSE headers
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>
#include "ops/common/checks.h"
#include "ops/cuda/launchers.h"

namespace carprune {
namespace {

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "carprune.", op, ": CUDA launch failed: ",
              cudaGetErrorString(err));
}

at::Tensor ablate_conv_cuda(const at::Tensor& a_in, const at::Tensor& weight_in,
                            const at::Tensor& z_in, const at::Tensor& scale_in,
                            const at::Tensor& shift_in, const at::Tensor& channels_in,
                            at::IntArrayRef stride, at::IntArrayRef padding,
                            at::IntArrayRef dilation, bool relu) {
  const ConvGeom g = check_ablate_conv(a_in, weight_in, z_in, scale_in, shift_in, channels_in,
                                       stride, padding, dilation);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const auto a = a_in.contiguous(), weight = weight_in.contiguous(), z = z_in.contiguous();
  const auto scale = scale_in.contiguous(), shift = shift_in.contiguous();
  const auto channels = channels_in.contiguous();
  const int64_t B = a.size(0), C = a.size(1), F = weight.size(0), m = channels.size(0);
  if (m > 0) {
    const auto lo = channels.min().item<int64_t>(), hi = channels.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < C, "carprune.ablate_conv: channel indices must lie in [0, ", C,
                "), got [", lo, ", ", hi, "]");
  }
  auto out = at::empty({m, B, F, g.Ho, g.Wo}, a.options());
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "carprune_ablate_conv_cuda", [&] {
    check_launch(cuda::launch_ablate_conv<scalar_t>(
                     a.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(),
                     scale.data_ptr<scalar_t>(), shift.data_ptr<scalar_t>(),
                     channels.data_ptr<int64_t>(), out.data_ptr<scalar_t>(), m, B, C, F, g, relu,
                     stream),
                 "ablate_conv");
  });
  return out;
}

at::Tensor ablate_conv_head_cuda(const at::Tensor& a_in, const at::Tensor& weight_in,
                                 const at::Tensor& z_in, const at::Tensor& scale_in,
                                 const at::Tensor& shift_in, const at::Tensor& channels_in,
                                 at::IntArrayRef stride, at::IntArrayRef padding,
                                 at::IntArrayRef dilation, bool relu,
                                 const std::optional<at::Tensor>& residual_in, bool relu_after,
                                 const at::Tensor& fc_weight_in,
                                 const std::optional<at::Tensor>& fc_bias_in) {
  const ConvGeom g = check_ablate_conv_head(a_in, weight_in, z_in, scale_in, shift_in,
                                            channels_in, stride, padding, dilation, residual_in,
                                            fc_weight_in, fc_bias_in);
  const c10::cuda::CUDAGuard guard(a_in.device());
  const auto a = a_in.contiguous(), weight = weight_in.contiguous(), z = z_in.contiguous();
  const auto scale = scale_in.contiguous(), shift = shift_in.contiguous();
  const auto channels = channels_in.contiguous(), fc_weight = fc_weight_in.contiguous();
  const at::Tensor residual = residual_in.has_value() ? residual_in->contiguous() : at::Tensor();
  const at::Tensor fc_bias = fc_bias_in.has_value() ? fc_bias_in->contiguous() : at::Tensor();
  const int64_t B = a.size(0), C = a.size(1), F = weight.size(0), m = channels.size(0);
  const int64_t K = fc_weight.size(0);
  if (m > 0) {
    const auto lo = channels.min().item<int64_t>(), hi = channels.max().item<int64_t>();
    TORCH_CHECK(lo >= -1 && hi < C, "carprune.ablate_conv_head: channel indices must lie in "
                "[-1, ", C, "), got [", lo, ", ", hi, "]");
  }
  auto out = at::empty({m, B, K}, a.options());
  auto mean = at::empty({m * B * F}, a.options());  // pooled features, [m * B, F]
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "carprune_ablate_conv_head_cuda", [&] {
    check_launch(cuda::launch_ablate_conv_head<scalar_t>(
                     a.data_ptr<scalar_t>(), weight.data_ptr<scalar_t>(), z.data_ptr<scalar_t>(),
                     scale.data_ptr<scalar_t>(), shift.data_ptr<scalar_t>(),
                     residual.defined() ? residual.data_ptr<scalar_t>() : nullptr,
                     channels.data_ptr<int64_t>(), fc_weight.data_ptr<scalar_t>(),
                     fc_bias.defined() ? fc_bias.data_ptr<scalar_t>() : nullptr,
                     mean.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), m, B, C, F, K, g, relu,
                     relu_after, stream),
                 "ablate_conv_head");
  });
  return out;
}

at::Tensor class_correct_counts_cuda(const at::Tensor& logits_in, const at::Tensor& labels_in,
                                     int64_t topk) {
  check_class_correct_counts(logits_in, labels_in, topk);
  const c10::cuda::CUDAGuard guard(logits_in.device());
  const int64_t m = logits_in.size(0), B = logits_in.size(1), K = logits_in.size(2);
  const auto logits = (logits_in.scalar_type() == at::kDouble ? logits_in
                                                               : logits_in.to(at::kFloat))
                          .contiguous();
  const auto labels = labels_in.contiguous();
  if (B > 0) {
    const auto lo = labels.min().item<int64_t>(), hi = labels.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < K, "carprune.class_correct_counts: labels must lie in [0, ", K,
                ") for ", K, " classes, got labels in [", lo, ", ", hi, "]");
  }
  auto counts = at::zeros({m, K}, labels.options());
  const auto stream = c10::cuda::getCurrentCUDAStream().stream();
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "carprune_class_correct_counts_cuda", [&] {
    check_launch(cuda::launch_class_correct_counts<scalar_t>(
                     logits.data_ptr<scalar_t>(), labels.data_ptr<int64_t>(),
                     counts.data_ptr<int64_t>(), m, B, K, topk, stream),
                 "class_correct_counts");
  });
  return counts;
}

}  // namespace

TORCH_LIBRARY_IMPL(carprune, CUDA, m) {
  m.impl("ablate_conv", &ablate_conv_cuda);
  m.impl("ablate_conv_head", &ablate_conv_head_cuda);
  m.impl("class_correct_counts", &class_correct_counts_cuda);
}

}  // namespace carprune
