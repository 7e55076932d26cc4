// CUDA kernel of carprune::ablate_conv: one thread per output element (j, b, f, y, x).
#include "ops/cuda/launchers.h"

namespace carprune::cuda {
namespace {

template <typename T>
__global__ void ablate_conv_kernel(const T* __restrict__ a, const T* __restrict__ weight,
                                   const T* __restrict__ z, const T* __restrict__ scale,
                                   const T* __restrict__ shift, const int64_t* __restrict__ channels,
                                   T* __restrict__ out, int64_t m, int64_t B, int64_t C, int64_t F,
                                   ConvGeom g, bool relu) {
  const int64_t P = g.Ho * g.Wo, K = g.kh * g.kw;
  const int64_t total = m * B * F * P;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t p = i % P, f = (i / P) % F, b = (i / (P * F)) % B, j = i / (P * F * B);
    const int64_t s = channels[j], y = p / g.Wo, x = p - y * g.Wo;
    const T* plane = a + (b * C + s) * g.H * g.W;
    const T* w = weight + (f * C + s) * K;
    T acc = T(0);
    for (int64_t k = 0; k < K; ++k) acc += w[k] * conv_tap(plane, g, k, y, x);
    out[i] = ablated_output(z[(b * F + f) * P + p], acc, scale[f], shift[f], relu);
  }
}

}  // namespace

template <typename T>
cudaError_t launch_ablate_conv(const T* a, const T* weight, const T* z, const T* scale,
                               const T* shift, const int64_t* channels, T* out, int64_t m,
                               int64_t B, int64_t C, int64_t F, ConvGeom g, bool relu,
                               cudaStream_t stream) {
  const int64_t total = m * B * F * g.Ho * g.Wo;
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, int64_t(1) << 20);
  ablate_conv_kernel<T><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      a, weight, z, scale, shift, channels, out, m, B, C, F, g, relu);
  return cudaGetLastError();
}

template cudaError_t launch_ablate_conv<float>(const float*, const float*, const float*,
                                               const float*, const float*, const int64_t*, float*,
                                               int64_t, int64_t, int64_t, int64_t, ConvGeom, bool,
                                               cudaStream_t);
template cudaError_t launch_ablate_conv<double>(const double*, const double*, const double*,
                                                const double*, const double*, const int64_t*,
                                                double*, int64_t, int64_t, int64_t, int64_t,
                                                ConvGeom, bool, cudaStream_t);

}  // namespace carprune::cuda
