// CUDA kernel of carprune::class_correct_counts: one thread per (ablation, image); integer
// atomics make the result independent of scheduling.
#include "ops/cuda/launchers.h"

namespace carprune::cuda {
namespace {

template <typename T>
__global__ void class_correct_counts_kernel(const T* __restrict__ logits,
                                            const int64_t* __restrict__ labels,
                                            unsigned long long* __restrict__ counts, int64_t m,
                                            int64_t B, int64_t K, int64_t topk) {
  const int64_t total = m * B;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    const int64_t j = i / B, b = i - j * B, label = labels[b];
    if (topk_correct(logits + i * K, K, label, topk)) atomicAdd(counts + j * K + label, 1ULL);
  }
}

}  // namespace

template <typename T>
cudaError_t launch_class_correct_counts(const T* logits, const int64_t* labels, int64_t* counts,
                                        int64_t m, int64_t B, int64_t K, int64_t topk,
                                        cudaStream_t stream) {
  const int64_t total = m * B;
  if (total == 0) return cudaSuccess;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((total + threads - 1) / threads, int64_t(1) << 20);
  class_correct_counts_kernel<T><<<static_cast<unsigned>(blocks), threads, 0, stream>>>(
      logits, labels, reinterpret_cast<unsigned long long*>(counts), m, B, K, topk);
  return cudaGetLastError();
}

template cudaError_t launch_class_correct_counts<float>(const float*, const int64_t*, int64_t*,
                                                        int64_t, int64_t, int64_t, int64_t,
                                                        cudaStream_t);
template cudaError_t launch_class_correct_counts<double>(const double*, const int64_t*, int64_t*,
                                                         int64_t, int64_t, int64_t, int64_t,
                                                         cudaStream_t);

}  // namespace carprune::cuda
