// CPU kernel of carprune::ablate_conv: the consumer conv's output with one input channel
// removed, for a batch of ablations, from the full pre-activation computed once.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <vector>
#include "ops/common/arith.h"
#include "ops/common/checks.h"

namespace carprune {
namespace {

// One (ablation j, image b) pair: gather the taps of input plane a[b, s] once (im2col of a
// single channel, shared by all F outputs), then for each output channel f subtract that
// channel's contribution from z and apply the folded BatchNorm and activation. The inner loops
// run over contiguous output positions, so they vectorise.
template <typename T>
void ablate_pair(const T* plane, const T* w_s, int64_t w_fstride, const T* z_b, const T* scale,
                 const T* shift, T* out_b, int64_t F, const ConvGeom& g, bool relu, T* col,
                 T* acc) {
  const int64_t P = g.Ho * g.Wo, K = g.kh * g.kw;
  for (int64_t k = 0; k < K; ++k)
    for (int64_t y = 0; y < g.Ho; ++y)
      for (int64_t x = 0; x < g.Wo; ++x) col[k * P + y * g.Wo + x] = conv_tap(plane, g, k, y, x);
  for (int64_t f = 0; f < F; ++f) {
    const T* w = w_s + f * w_fstride;
    for (int64_t p = 0; p < P; ++p) acc[p] = T(0);
    for (int64_t k = 0; k < K; ++k) {
      const T wk = w[k];
      const T* c = col + k * P;
      for (int64_t p = 0; p < P; ++p) acc[p] += wk * c[p];
    }
    const T* zf = z_b + f * P;
    T* of = out_b + f * P;
    const T sc = scale[f], sh = shift[f];
    for (int64_t p = 0; p < P; ++p) of[p] = ablated_output(zf[p], acc[p], sc, sh, relu);
  }
}

// The same pair with z and the output in channels_last (position-major: [P, F] per image), for
// tails that read channels_last: acc is [P, F], its inner loop over the F output channels (the
// weights of channel s transposed to [K, F] once per pair). Every value is summed over k in the
// same order as ablate_pair, so the two layouts give identical numbers.
template <typename T>
void ablate_pair_nhwc(const T* plane, const T* w_s, int64_t w_fstride, const T* z_b,
                      const T* scale, const T* shift, T* out_b, int64_t F, const ConvGeom& g,
                      bool relu, T* col, T* acc, T* w_t) {
  const int64_t P = g.Ho * g.Wo, K = g.kh * g.kw;
  for (int64_t k = 0; k < K; ++k)
    for (int64_t y = 0; y < g.Ho; ++y)
      for (int64_t x = 0; x < g.Wo; ++x) col[k * P + y * g.Wo + x] = conv_tap(plane, g, k, y, x);
  for (int64_t f = 0; f < F; ++f)
    for (int64_t k = 0; k < K; ++k) w_t[k * F + f] = w_s[f * w_fstride + k];
  for (int64_t i = 0; i < P * F; ++i) acc[i] = T(0);
  for (int64_t k = 0; k < K; ++k) {
    const T* wk = w_t + k * F;
    const T* c = col + k * P;
    for (int64_t p = 0; p < P; ++p) {
      const T cp = c[p];
      T* ap = acc + p * F;
      for (int64_t f = 0; f < F; ++f) ap[f] += wk[f] * cp;
    }
  }
  for (int64_t p = 0; p < P; ++p) {
    const T* zp = z_b + p * F;
    const T* ap = acc + p * F;
    T* op = out_b + p * F;
    for (int64_t f = 0; f < F; ++f) op[f] = ablated_output(zp[f], ap[f], scale[f], shift[f], relu);
  }
}

at::Tensor ablate_conv_cpu(const at::Tensor& a_in, const at::Tensor& weight_in,
                           const at::Tensor& z_in, const at::Tensor& scale_in,
                           const at::Tensor& shift_in, const at::Tensor& channels_in,
                           at::IntArrayRef stride, at::IntArrayRef padding,
                           at::IntArrayRef dilation, bool relu) {
  const ConvGeom g = check_ablate_conv(a_in, weight_in, z_in, scale_in, shift_in, channels_in,
                                       stride, padding, dilation);
  // z in channels_last (and not also plain contiguous, as a 1x1 plane is): so is the output
  const bool nhwc = !z_in.is_contiguous() && z_in.is_contiguous(at::MemoryFormat::ChannelsLast);
  const auto a = a_in.contiguous(), weight = weight_in.contiguous();
  const auto z = nhwc ? z_in : z_in.contiguous();
  const auto scale = scale_in.contiguous(), shift = shift_in.contiguous();
  const auto channels = channels_in.contiguous();
  const int64_t B = a.size(0), C = a.size(1), F = weight.size(0), m = channels.size(0);
  const int64_t P = g.Ho * g.Wo, K = g.kh * g.kw;
  // channels_last: [m, B, Ho, Wo, F] in memory, returned as its [m, B, F, Ho, Wo] view
  auto out = nhwc ? at::empty({m, B, g.Ho, g.Wo, F}, a.options()).permute({0, 1, 4, 2, 3})
                  : at::empty({m, B, F, g.Ho, g.Wo}, a.options());
  if (out.numel() == 0) return out;
  const int64_t* ch = channels.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "carprune_ablate_conv_cpu", [&] {
    const scalar_t* ap = a.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    const scalar_t* zp = z.data_ptr<scalar_t>();
    const scalar_t* scp = scale.data_ptr<scalar_t>();
    const scalar_t* shp = shift.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    // Grain: enough pairs per task to amortise the scratch buffers.
    const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(1, F * P / 64));
    at::parallel_for(0, m * B, grain, [&](int64_t begin, int64_t end) {
      std::vector<scalar_t> col(K * P), acc(nhwc ? P * F : P), w_t(nhwc ? K * F : 0);
      for (int64_t i = begin; i < end; ++i) {
        const int64_t j = i / B, b = i - j * B, s = ch[j];
        if (nhwc)
          ablate_pair_nhwc<scalar_t>(ap + (b * C + s) * g.H * g.W, wp + s * K, C * K,
                                     zp + b * F * P, scp, shp, op + i * F * P, F, g, relu,
                                     col.data(), acc.data(), w_t.data());
        else
          ablate_pair<scalar_t>(ap + (b * C + s) * g.H * g.W, wp + s * K, C * K, zp + b * F * P,
                                scp, shp, op + i * F * P, F, g, relu, col.data(), acc.data());
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(carprune, CPU, m) { m.impl("ablate_conv", &ablate_conv_cpu); }

}  // namespace carprune
