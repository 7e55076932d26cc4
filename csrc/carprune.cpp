// Op schemas of the carprune library and the argument checks every backend shares.
#include <torch/library.h>
#include <pybind11/pybind11.h>
#include "ops/common/checks.h"

namespace carprune {

ConvGeom check_ablate_conv(const at::Tensor& a, const at::Tensor& weight, const at::Tensor& z,
                           const at::Tensor& scale, const at::Tensor& shift,
                           const at::Tensor& channels, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation) {
  TORCH_CHECK(a.dim() == 4, "carprune.ablate_conv: activations `a` must be [B, C, H, W], got ",
              a.sizes());
  TORCH_CHECK(weight.dim() == 4, "carprune.ablate_conv: `weight` must be [F, C, kh, kw], got ",
              weight.sizes());
  TORCH_CHECK(z.dim() == 4, "carprune.ablate_conv: pre-activation `z` must be [B, F, Ho, Wo], got ",
              z.sizes());
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble,
              "carprune.ablate_conv: activations must be float32 or float64, got ", a.scalar_type());
  for (auto [t, name] : {std::pair{&weight, "weight"}, {&z, "z"}, {&scale, "scale"},
                         {&shift, "shift"}}) {
    TORCH_CHECK(t->scalar_type() == a.scalar_type(), "carprune.ablate_conv: `", name, "` is ",
                t->scalar_type(), " but the activations are ", a.scalar_type());
    check_same_device(a, *t, name);
  }
  check_same_device(a, channels, "channels");
  TORCH_CHECK(channels.dim() == 1 && channels.scalar_type() == at::kLong,
              "carprune.ablate_conv: `channels` must be a 1-D int64 tensor of channel indices");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              "carprune.ablate_conv: stride, padding and dilation take two values each");
  const int64_t B = a.size(0), C = a.size(1), F = weight.size(0);
  TORCH_CHECK(weight.size(1) == C, "carprune.ablate_conv: weight has ", weight.size(1),
              " input channels but the activations have ", C, " (grouped convs are not supported)");
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0 && dilation[0] > 0 && dilation[1] > 0 &&
                  padding[0] >= 0 && padding[1] >= 0,
              "carprune.ablate_conv: stride and dilation must be positive, padding non-negative");
  ConvGeom g{a.size(2), a.size(3), 0, 0, weight.size(2), weight.size(3), stride[0], stride[1],
             padding[0], padding[1], dilation[0], dilation[1]};
  g.Ho = (g.H + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.Wo = (g.W + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.Ho > 0 && g.Wo > 0, "carprune.ablate_conv: the kernel does not fit the input");
  TORCH_CHECK(z.size(0) == B && z.size(1) == F && z.size(2) == g.Ho && z.size(3) == g.Wo,
              "carprune.ablate_conv: `z` must be [", B, ", ", F, ", ", g.Ho, ", ", g.Wo,
              "] (the conv of `a`), got ", z.sizes());
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == F && shift.dim() == 1 && shift.size(0) == F,
              "carprune.ablate_conv: `scale` and `shift` must be [", F, "]");
  if (channels.numel() > 0 && channels.device().is_cpu()) {
    const auto lo = channels.min().item<int64_t>(), hi = channels.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < C, "carprune.ablate_conv: channel indices must lie in [0, ", C,
                "), got [", lo, ", ", hi, "]");
  }
  return g;
}

void check_class_correct_counts(const at::Tensor& logits, const at::Tensor& labels, int64_t topk) {
  TORCH_CHECK(logits.dim() == 3,
              "carprune.class_correct_counts: `logits` must be [m, B, K], got ", logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble ||
                  logits.scalar_type() == at::kHalf || logits.scalar_type() == at::kBFloat16,
              "carprune.class_correct_counts: `logits` must be floating point, got ",
              logits.scalar_type());
  TORCH_CHECK(labels.dim() == 1 && labels.size(0) == logits.size(1),
              "carprune.class_correct_counts: `labels` must be [", logits.size(1), "], got ",
              labels.sizes());
  TORCH_CHECK(labels.scalar_type() == at::kLong,
              "carprune.class_correct_counts: `labels` must be int64, got ", labels.scalar_type());
  check_same_device(logits, labels, "labels");
  TORCH_CHECK(logits.size(2) > 0, "carprune.class_correct_counts: logits have no classes");
  TORCH_CHECK(topk >= 1, "carprune.class_correct_counts: topk must be >= 1, got ", topk);
}

}  // namespace carprune

TORCH_LIBRARY(carprune, m) {
  // out[j, b, f] = act(scale[f] * (z[b, f] - conv(a[b, channels[j]], weight[f, channels[j]]))
  //                    + shift[f]): the consumer conv's output with input channel channels[j]
  //                    removed, for every j at once. z = conv(a, weight) (+ bias) is computed once.
  m.def("ablate_conv(Tensor a, Tensor weight, Tensor z, Tensor scale, Tensor shift, "
        "Tensor channels, int[2] stride, int[2] padding, int[2] dilation, bool relu) -> Tensor");
  // counts[j, c] = number of images of class c that ablation j still classifies correctly
  // (label among the top-k logits, ties broken as torch.argmax breaks them).
  m.def("class_correct_counts(Tensor logits, Tensor labels, int topk=1) -> Tensor");
}

PYBIND11_MODULE(_C, m) {
  m.doc() = "carprune native ops (registered as torch.ops.carprune.*)";
#ifdef CARPRUNE_WITH_CUDA
  m.attr("with_cuda") = true;
#else
  m.attr("with_cuda") = false;
#endif
}
