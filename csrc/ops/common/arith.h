// Arithmetic shared by the CPU and CUDA kernels. Every value either kernel produces goes
// through these functions, so the CPU tests exercise the code the GPU runs.
#pragma once
#include <cstdint>

#if defined(__CUDACC__)
#define CP_HD __host__ __device__ __forceinline__
#else
#define CP_HD inline
#endif

namespace carprune {

// Geometry of a 2-D convolution (groups = 1), in the layout of NCHW tensors.
struct ConvGeom {
  int64_t H, W;        // input plane
  int64_t Ho, Wo;      // output plane
  int64_t kh, kw;      // kernel
  int64_t sh, sw;      // stride
  int64_t ph, pw;      // padding
  int64_t dh, dw;      // dilation
};

// Tap k (row-major over kh x kw) of output position (y, x) reads input (iy, ix), or padding.
// Returns the input value there, or zero where the tap falls into the zero padding.
template <typename T>
CP_HD T conv_tap(const T* plane, const ConvGeom& g, int64_t k, int64_t y, int64_t x) {
  const int64_t ky = k / g.kw, kx = k - ky * g.kw;
  const int64_t iy = y * g.sh - g.ph + ky * g.dh;
  const int64_t ix = x * g.sw - g.pw + kx * g.dw;
  return (iy >= 0 && iy < g.H && ix >= 0 && ix < g.W) ? plane[iy * g.W + ix] : T(0);
}

// The consumer's output once input channel s is removed: its contribution `contrib` is taken
// out of the full pre-activation z, then the folded BatchNorm (scale, shift) and the activation.
template <typename T>
CP_HD T ablated_output(T z, T contrib, T scale, T shift, bool relu) {
  const T v = scale * (z - contrib) + shift;
  return (relu && !(v > T(0))) ? (v != v ? v : T(0)) : v;  // ReLU, NaN kept as NaN (like torch)
}

// ReLU that keeps NaN (like torch.relu): a compare and a blend, so it vectorises. T{} is zero,
// so the same code serves scalars and the CPU kernels' GCC vector types.
template <typename T>
CP_HD T relu_keep_nan(T v) {
  return v < T{} ? T{} : v;
}

// -- ablate_conv_head: the consumer conv, then the standard residual-network ending ------------
// Per output channel f and position p of one image, with input channel s removed:
//   v = act_after(act(scale*(z - conv(a[s], w[:, s])) + shift) + residual)
// computed as head_value(head_base(z, ...), sum_k head_weight(scale, w_k) * a_k, residual):
// the BatchNorm scale is folded into the removed channel's weights, and without the consumer's
// own activation the residual is folded into the base (both are per image, not per ablation).

// The removed channel's weight with the folded BatchNorm scale.
template <typename T>
CP_HD T head_weight(T scale, T w) {
  return scale * w;
}

// The unablated value before the removed contribution is subtracted.
template <typename T>
CP_HD T head_base(T z, T scale, T shift, T residual, bool relu) {
  const T u = scale * z + shift;
  return relu ? u : u + residual;
}

// The ablated value at one (f, p) from its base and the removed channel's contribution.
template <typename T>
CP_HD T head_value(T base, T contrib, T residual, bool relu, bool relu_after) {
  T t = base - contrib;
  if (relu) t = relu_keep_nan(t) + residual;
  return relu_after ? relu_keep_nan(t) : t;
}

// Global average pool of one channel from its sum over `count` positions.
template <typename T>
CP_HD T head_mean(T sum, int64_t count) {
  return sum / T(count);
}

// a ranks above b in torch.argmax order: larger value, NaN above everything; equal values
// rank by lower index. Used to decide top-k membership without sorting.
template <typename T>
CP_HD bool ranks_above(T a, int64_t ia, T b, int64_t ib) {
  const bool an = a != a, bn = b != b;
  if (an || bn) return an && (!bn || ia < ib);
  return a > b || (a == b && ia < ib);
}

// Whether `label` is among the top-k classes of one row of logits, ties broken as torch.argmax
// breaks them (first index wins), so topk=1 agrees with logits.argmax() == label exactly.
template <typename T>
CP_HD bool topk_correct(const T* row, int64_t K, int64_t label, int64_t topk) {
  const T v = row[label];
  int64_t above = 0;
  for (int64_t k = 0; k < K; ++k) above += ranks_above(row[k], k, v, label) ? 1 : 0;
  return above < topk;
}

}  // namespace carprune
