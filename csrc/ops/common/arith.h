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
