// CUDA kernels of carprune::ablate_conv_head. First one warp per (ablation j, image b, output
// channel f): its lanes walk the output positions, each value goes through the shared
// head_base/head_value arithmetic, and a fixed-order shuffle reduction gives the pooled mean.
// Then one thread per (j, b, class) applies the linear layer, summing over f in increasing order
// as the CPU kernel does. No atomics: the result does not depend on scheduling.
#include "ops/cuda/launchers.h"

namespace carprune::cuda {
namespace {

constexpr int kWarp = 32;

template <typename T>
__global__ void head_pool_kernel(const T* __restrict__ a, const T* __restrict__ weight,
                                 const T* __restrict__ z, const T* __restrict__ scale,
                                 const T* __restrict__ shift, const T* __restrict__ residual,
                                 const int64_t* __restrict__ channels, T* __restrict__ mean,
                                 int64_t m, int64_t B, int64_t C, int64_t F, ConvGeom g, bool relu,
                                 bool relu_after) {
  const int64_t P = g.Ho * g.Wo, taps = g.kh * g.kw;
  const int lane = threadIdx.x % kWarp;
  const int64_t warps = m * B * F;
  const int64_t first = (blockIdx.x * int64_t(blockDim.x) + threadIdx.x) / kWarp;
  const int64_t stride = int64_t(gridDim.x) * blockDim.x / kWarp;
  for (int64_t w = first; w < warps; w += stride) {  // uniform across the warp
    const int64_t f = w % F, b = (w / F) % B, j = w / (F * B);
    const int64_t s = channels[j];
    const T sc = scale[f], sh = shift[f];
    const T* plane = s >= 0 ? a + (b * C + s) * g.H * g.W : nullptr;
    const T* wf = s >= 0 ? weight + (f * C + s) * taps : nullptr;
    const T* zf = z + (b * F + f) * P;
    const T* rf = residual != nullptr ? residual + (b * F + f) * P : nullptr;
    T sum = T(0);
    for (int64_t p = lane; p < P; p += kWarp) {
      const int64_t y = p / g.Wo, x = p - y * g.Wo;
      T contrib = T(0);
      if (plane != nullptr)
        for (int64_t k = 0; k < taps; ++k)
          contrib += head_weight(sc, wf[k]) * conv_tap(plane, g, k, y, x);
      const T r = rf != nullptr ? rf[p] : T(0);
      sum += head_value(head_base(zf[p], sc, sh, r, relu), contrib, relu ? r : T(0), relu,
                        relu_after);
    }
    for (int off = kWarp / 2; off > 0; off /= 2) sum += __shfl_down_sync(0xffffffffu, sum, off);
    if (lane == 0) mean[w] = head_mean(sum, P);
  }
}

template <typename T>
__global__ void head_linear_kernel(const T* __restrict__ mean, const T* __restrict__ fc_weight,
                                   const T* __restrict__ fc_bias, T* __restrict__ out,
                                   int64_t rows, int64_t F, int64_t K) {
  const int64_t total = rows * K;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t row = i / K, k = i - row * K;
    const T* mr = mean + row * F;
    const T* wk = fc_weight + k * F;
    T acc = T(0);
    for (int64_t f = 0; f < F; ++f) acc += wk[f] * mr[f];
    out[i] = acc + (fc_bias != nullptr ? fc_bias[k] : T(0));
  }
}

int64_t blocks_for(int64_t threads_needed, int threads) {
  return std::min<int64_t>((threads_needed + threads - 1) / threads, int64_t(1) << 20);
}

}  // namespace

template <typename T>
cudaError_t launch_ablate_conv_head(const T* a, const T* weight, const T* z, const T* scale,
                                    const T* shift, const T* residual, const int64_t* channels,
                                    const T* fc_weight, const T* fc_bias, T* mean, T* out,
                                    int64_t m, int64_t B, int64_t C, int64_t F, int64_t K,
                                    ConvGeom g, bool relu, bool relu_after, cudaStream_t stream) {
  if (m * B == 0) return cudaSuccess;
  const int threads = 256;
  head_pool_kernel<T><<<static_cast<unsigned>(blocks_for(m * B * F * kWarp, threads)), threads,
                        0, stream>>>(a, weight, z, scale, shift, residual, channels, mean, m, B,
                                     C, F, g, relu, relu_after);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  head_linear_kernel<T><<<static_cast<unsigned>(blocks_for(m * B * K, threads)), threads, 0,
                          stream>>>(mean, fc_weight, fc_bias, out, m * B, F, K);
  return cudaGetLastError();
}

template cudaError_t launch_ablate_conv_head<float>(const float*, const float*, const float*,
                                                    const float*, const float*, const float*,
                                                    const int64_t*, const float*, const float*,
                                                    float*, float*, int64_t, int64_t, int64_t,
                                                    int64_t, int64_t, ConvGeom, bool, bool,
                                                    cudaStream_t);
template cudaError_t launch_ablate_conv_head<double>(const double*, const double*, const double*,
                                                     const double*, const double*, const double*,
                                                     const int64_t*, const double*, const double*,
                                                     double*, double*, int64_t, int64_t, int64_t,
                                                     int64_t, int64_t, ConvGeom, bool, bool,
                                                     cudaStream_t);

}  // namespace carprune::cuda
