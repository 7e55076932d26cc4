// Op schemas of the carprune library and the argument checks every backend shares.
#include <torch/library.h>
#include <pybind11/pybind11.h>
#include "ops/common/checks.h"

namespace carprune {

namespace {

// The consumer-conv arguments ablate_conv and ablate_conv_head share; `op` names the op in every
// message and channel indices must lie in [lowest, C).
ConvGeom check_conv_args(const char* op, const at::Tensor& a, const at::Tensor& weight,
                         const at::Tensor& z, const at::Tensor& scale, const at::Tensor& shift,
                         const at::Tensor& channels, at::IntArrayRef stride,
                         at::IntArrayRef padding, at::IntArrayRef dilation, int64_t lowest) {
  TORCH_CHECK(a.dim() == 4, op, ": activations `a` must be [B, C, H, W], got ",
              a.sizes());
  TORCH_CHECK(weight.dim() == 4, op, ": `weight` must be [F, C, kh, kw], got ",
              weight.sizes());
  TORCH_CHECK(z.dim() == 4, op, ": pre-activation `z` must be [B, F, Ho, Wo], got ",
              z.sizes());
  TORCH_CHECK(a.scalar_type() == at::kFloat || a.scalar_type() == at::kDouble,
              op, ": activations must be float32 or float64, got ", a.scalar_type());
  for (auto [t, name] : {std::pair{&weight, "weight"}, {&z, "z"}, {&scale, "scale"},
                         {&shift, "shift"}}) {
    TORCH_CHECK(t->scalar_type() == a.scalar_type(), op, ": `", name, "` is ",
                t->scalar_type(), " but the activations are ", a.scalar_type());
    check_same_device(a, *t, name);
  }
  check_same_device(a, channels, "channels");
  TORCH_CHECK(channels.dim() == 1 && channels.scalar_type() == at::kLong,
              op, ": `channels` must be a 1-D int64 tensor of channel indices");
  TORCH_CHECK(stride.size() == 2 && padding.size() == 2 && dilation.size() == 2,
              op, ": stride, padding and dilation take two values each");
  const int64_t B = a.size(0), C = a.size(1), F = weight.size(0);
  TORCH_CHECK(weight.size(1) == C, op, ": weight has ", weight.size(1),
              " input channels but the activations have ", C, " (grouped convs are not supported)");
  TORCH_CHECK(stride[0] > 0 && stride[1] > 0 && dilation[0] > 0 && dilation[1] > 0 &&
                  padding[0] >= 0 && padding[1] >= 0,
              op, ": stride and dilation must be positive, padding non-negative");
  ConvGeom g{a.size(2), a.size(3), 0, 0, weight.size(2), weight.size(3), stride[0], stride[1],
             padding[0], padding[1], dilation[0], dilation[1]};
  g.Ho = (g.H + 2 * g.ph - g.dh * (g.kh - 1) - 1) / g.sh + 1;
  g.Wo = (g.W + 2 * g.pw - g.dw * (g.kw - 1) - 1) / g.sw + 1;
  TORCH_CHECK(g.Ho > 0 && g.Wo > 0, op, ": the kernel does not fit the input");
  TORCH_CHECK(z.size(0) == B && z.size(1) == F && z.size(2) == g.Ho && z.size(3) == g.Wo,
              op, ": `z` must be [", B, ", ", F, ", ", g.Ho, ", ", g.Wo,
              "] (the conv of `a`), got ", z.sizes());
  TORCH_CHECK(scale.dim() == 1 && scale.size(0) == F && shift.dim() == 1 && shift.size(0) == F,
              op, ": `scale` and `shift` must be [", F, "]");
  if (channels.numel() > 0 && channels.device().is_cpu()) {
    const auto lo = channels.min().item<int64_t>(), hi = channels.max().item<int64_t>();
    TORCH_CHECK(lo >= lowest && hi < C, op, ": channel indices must lie in [", lowest, ", ", C,
                "), got [", lo, ", ", hi, "]");
  }
  return g;
}

}  // namespace

ConvGeom check_ablate_conv(const at::Tensor& a, const at::Tensor& weight, const at::Tensor& z,
                           const at::Tensor& scale, const at::Tensor& shift,
                           const at::Tensor& channels, at::IntArrayRef stride,
                           at::IntArrayRef padding, at::IntArrayRef dilation) {
  return check_conv_args("carprune.ablate_conv", a, weight, z, scale, shift, channels, stride,
                         padding, dilation, 0);
}

ConvGeom check_ablate_conv_head(const at::Tensor& a, const at::Tensor& weight, const at::Tensor& z,
                                const at::Tensor& scale, const at::Tensor& shift,
                                const at::Tensor& channels, at::IntArrayRef stride,
                                at::IntArrayRef padding, at::IntArrayRef dilation,
                                const std::optional<at::Tensor>& residual,
                                const at::Tensor& fc_weight,
                                const std::optional<at::Tensor>& fc_bias) {
  const char* op = "carprune.ablate_conv_head";
  const ConvGeom g = check_conv_args(op, a, weight, z, scale, shift, channels, stride, padding,
                                     dilation, -1);
  const int64_t F = weight.size(0);
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == z.sizes(), op, ": `residual` must have the shape of `z`, ",
                z.sizes(), ", got ", residual->sizes());
    TORCH_CHECK(residual->scalar_type() == a.scalar_type(), op, ": `residual` is ",
                residual->scalar_type(), " but the activations are ", a.scalar_type());
    check_same_device(a, *residual, "residual");
  }
  TORCH_CHECK(fc_weight.dim() == 2 && fc_weight.size(1) == F && fc_weight.size(0) > 0, op,
              ": `fc_weight` must be [K, ", F, "] with K >= 1 (one column per output channel of "
              "the consumer conv), got ", fc_weight.sizes());
  TORCH_CHECK(fc_weight.scalar_type() == a.scalar_type(), op, ": `fc_weight` is ",
              fc_weight.scalar_type(), " but the activations are ", a.scalar_type());
  check_same_device(a, fc_weight, "fc_weight");
  if (fc_bias.has_value()) {
    TORCH_CHECK(fc_bias->dim() == 1 && fc_bias->size(0) == fc_weight.size(0), op,
                ": `fc_bias` must be [", fc_weight.size(0), "], got ", fc_bias->sizes());
    TORCH_CHECK(fc_bias->scalar_type() == a.scalar_type(), op, ": `fc_bias` is ",
                fc_bias->scalar_type(), " but the activations are ", a.scalar_type());
    check_same_device(a, *fc_bias, "fc_bias");
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

void bind_block_cache(pybind11::module_& m);  // block_cache.cpp

}  // namespace carprune

TORCH_LIBRARY(carprune, m) {
  // out[j, b, f] = act(scale[f] * (z[b, f] - conv(a[b, channels[j]], weight[f, channels[j]]))
  //                    + shift[f]): the consumer conv's output with input channel channels[j]
  //                    removed, for every j at once. z = conv(a, weight) (+ bias) is computed once.
  m.def("ablate_conv(Tensor a, Tensor weight, Tensor z, Tensor scale, Tensor shift, "
        "Tensor channels, int[2] stride, int[2] padding, int[2] dilation, bool relu) -> Tensor");
  // out[j, b, k] = sum_f fc_weight[k, f] * mean_{y,x} v[f, y, x] + fc_bias[k], where
  //   v = act_after(act(scale[f] * (z[b, f] - conv(a[b, s], weight[f, s])) + shift[f])
  //                 + residual[b, f])
  // with s = channels[j] (-1: no channel removed), act = ReLU if `relu`, act_after = ReLU if
  // `relu_after`, no residual term if `residual` is None, no bias if `fc_bias` is None: the
  // consumer conv of ablate_conv followed by the standard residual-network ending (residual add,
  // ReLU, global average pool, linear), without materialising the ablated feature map.
  m.def("ablate_conv_head(Tensor a, Tensor weight, Tensor z, Tensor scale, Tensor shift, "
        "Tensor channels, int[2] stride, int[2] padding, int[2] dilation, bool relu, "
        "Tensor? residual, bool relu_after, Tensor fc_weight, Tensor? fc_bias) -> Tensor");
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
  carprune::bind_block_cache(m);
}
