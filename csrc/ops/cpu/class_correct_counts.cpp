// CPU kernel of carprune::class_correct_counts: per (ablation, class) correct counts from logits.
#include <ATen/Parallel.h>
#include <torch/library.h>
#include "ops/common/arith.h"
#include "ops/common/checks.h"

namespace carprune {
namespace {

at::Tensor class_correct_counts_cpu(const at::Tensor& logits_in, const at::Tensor& labels_in,
                                    int64_t topk) {
  check_class_correct_counts(logits_in, labels_in, topk);
  const int64_t m = logits_in.size(0), B = logits_in.size(1), K = logits_in.size(2);
  // Half/bfloat16 logits are compared in float: exact, since widening preserves order.
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
  const int64_t* lp = labels.data_ptr<int64_t>();
  int64_t* cp = counts.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "carprune_class_correct_counts_cpu", [&] {
    const scalar_t* xp = logits.data_ptr<scalar_t>();
    // Each task owns whole rows j of counts: no atomics, integer sums, thread-count invariant.
    at::parallel_for(0, m, std::max<int64_t>(1, 65536 / std::max<int64_t>(1, B * K)),
                     [&](int64_t begin, int64_t end) {
      for (int64_t j = begin; j < end; ++j)
        for (int64_t b = 0; b < B; ++b)
          cp[j * K + lp[b]] += topk_correct(xp + (j * B + b) * K, K, lp[b], topk) ? 1 : 0;
    });
  });
  return counts;
}

}  // namespace

TORCH_LIBRARY_IMPL(carprune, CPU, m) {
  m.impl("class_correct_counts", &class_correct_counts_cpu);
}

}  // namespace carprune
