// Raw-pointer launchers of the CUDA kernels. The .cu files include no ATen header, so nvcc
// stays fast and they compile-check with plain `nvcc -c` even where torch is a CPU build.
#pragma once
#include <cstdint>
#include <cuda_runtime.h>
#include "ops/common/arith.h"

namespace carprune::cuda {

template <typename T>
cudaError_t launch_ablate_conv(const T* a, const T* weight, const T* z, const T* scale,
                               const T* shift, const int64_t* channels, T* out, int64_t m,
                               int64_t B, int64_t C, int64_t F, ConvGeom g, bool relu,
                               cudaStream_t stream);

// `mean` is scratch of m * B * F elements (the pooled features); `residual`, `fc_bias` may be null.
template <typename T>
cudaError_t launch_ablate_conv_head(const T* a, const T* weight, const T* z, const T* scale,
                                    const T* shift, const T* residual, const int64_t* channels,
                                    const T* fc_weight, const T* fc_bias, T* mean, T* out,
                                    int64_t m, int64_t B, int64_t C, int64_t F, int64_t K,
                                    ConvGeom g, bool relu, bool relu_after, cudaStream_t stream);

template <typename T>
cudaError_t launch_class_correct_counts(const T* logits, const int64_t* labels, int64_t* counts,
                                        int64_t m, int64_t B, int64_t K, int64_t topk,
                                        cudaStream_t stream);

}  // namespace carprune::cuda
