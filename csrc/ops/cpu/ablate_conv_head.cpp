// CPU kernel of carprune::ablate_conv_head: per (ablation j, image b), the consumer conv with
// input channel channels[j] removed, the residual-network ending after it (residual add, ReLU,
// global average pool) and the linear classifier, giving logits [m, B, K] without ever writing
// the ablated feature map.
//
// Work is laid out position-major ([P][F], output channels contiguous) so that every inner loop
// runs over the F output channels and vectorises. Per image (once per call, shared by all of its
// ablations): the base values head_base(z, ...), the unablated values v0, their pooled sums and
// logits. Per (j, b): only the nonzero pixels of the removed input plane contribute (the cut
// follows a ReLU, so most are zero). Each is entered, through the kernel taps, in the lists of
// the output positions it reaches; per touched position the removed contribution is summed in
// registers for a group of output channels, and the pooled sums are the unablated ones plus, over
// the touched positions only, v - v0. A plane with no nonzero pixel leaves the logits unchanged.
//
// The result of each (j, b) depends on that pair's inputs alone (fixed summation orders, no
// reductions across pairs), so it is identical for any split of the work and any thread count.
// The hot loops are compiled for AVX-512, AVX2+FMA and the baseline x86-64 ISA and chosen at
// run time (CARPRUNE_CPU_ISA=default|avx2|avx512 forces one, for tests and measurements).
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <algorithm>
#include <bit>
#include <cstdlib>
#include <cstring>
#include <string>
#include <vector>
#include "ops/common/arith.h"
#include "ops/common/checks.h"

#if (defined(__GNUC__) || defined(__clang__)) && defined(__x86_64__)
#define CP_X86_DISPATCH 1
#define CP_ALWAYS_INLINE __attribute__((always_inline)) inline
#else
#define CP_X86_DISPATCH 0
#define CP_ALWAYS_INLINE inline
#endif

namespace carprune {
namespace {

// Read-only description of one call.
template <typename T>
struct Head {
  const T* a;       // [B, C, H, W]
  const T* z;       // [B, F, P]
  const T* res;     // [B, F, P] or null
  const T* wt;      // [m, taps, F]: head_weight(scale[f], weight[f, channels[j], tap])
  const T* scale;   // [F]
  const T* shift;   // [F]
  const T* fcw;     // [K, F]: the linear layer's weight
  const T* fcb;     // [K] (zeros without a bias)
  const int64_t* ch;
  T* out;           // [m, B, K]
  // For input row iy, the taps ky that read it and the output rows y they feed, as offsets:
  // rows[(iy * kh + i) * 2] = {ky * kw * F, y * Wo} for i < row_count[iy]; for input column ix,
  // cols[(ix * kw + i) * 2] = {kx * F, x}. An entry's weight offset and output position are
  // then sums.
  const int32_t* rows;
  const int32_t* row_count;
  const int32_t* cols;
  const int32_t* col_count;
  int64_t B, C, F, m, K, P, taps;
  ConvGeom g;
  bool relu, relu_after, has_res;
};

// Input coordinate i (of n) feeds output o = (i + pad - k * dil) / stride for each tap k where
// that is a whole number in [0, out): the scatter form of conv_tap, without any division later.
// Stored as {k * k_scale, o * o_scale}.
void tap_table(int64_t n, int64_t taps, int64_t out, int64_t stride, int64_t pad, int64_t dil,
               int64_t k_scale, int64_t o_scale, std::vector<int32_t>& table,
               std::vector<int32_t>& count) {
  table.assign(n * taps * 2, 0);
  count.assign(n, 0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < taps; ++k) {
      const int64_t t = i + pad - k * dil;
      if (t < 0 || t % stride != 0 || t / stride >= out) continue;
      const int64_t c = count[i]++;
      table[(i * taps + c) * 2] = static_cast<int32_t>(k * k_scale);
      table[(i * taps + c) * 2 + 1] = static_cast<int32_t>(t / stride * o_scale);
    }
}

// The inner loops over output channels work on blocks of kBytes (a GCC vector type: 16 bytes
// for the baseline ISA, 32 for AVX2, 64 for AVX-512), with a scalar loop for the remainder of F.
#if CP_X86_DISPATCH
template <typename T, int kBytes>
struct Block {
  typedef T type __attribute__((vector_size(kBytes)));
};
#else
template <typename T, int kBytes>
struct Block {
  using type = T;
};
#endif
template <typename T, int kBytes>
using BlockOf = typename Block<T, kBytes>::type;

template <typename V, typename T>
CP_ALWAYS_INLINE V load(const T* p) {
  V v;
  std::memcpy(&v, p, sizeof(V));
  return v;
}

template <typename V, typename T>
CP_ALWAYS_INLINE void store(T* p, V v) {
  std::memcpy(p, &v, sizeof(V));
}

// Per-task buffers. `image` is the image whose per-image values are loaded; `count` is all zero
// between pairs and `touched` all clear (each pair resets what it used).
template <typename T>
struct Scratch {
  std::vector<T> base, res, v0, pooled0, logits0, pooled, mean, entry_value;
  std::vector<int32_t> nzy, nzx, count, entry_offset, positions, unsorted, group;
  std::vector<uint64_t> touched;
  int64_t image = -1;

  explicit Scratch(const Head<T>& h)
      : base(h.P * h.F), res(h.relu && h.has_res ? h.P * h.F : 0), v0(h.P * h.F),
        pooled0(h.F), logits0(h.K), pooled(h.F), mean(h.F), entry_value(h.P * h.taps),
        nzy(h.g.H * h.g.W), nzx(h.g.H * h.g.W), count(h.P, 0), entry_offset(h.P * h.taps),
        positions(h.P), unsorted(h.P), group(h.taps + 2), touched((h.P + 63) / 64, 0) {}
};

// The ablated value in one of the canonical activation modes (kRes: the residual is added after
// the consumer's own ReLU; otherwise it is folded into the base, or absent).
template <typename T, bool kRelu, bool kAfter, bool kRes>
CP_ALWAYS_INLINE T mode_value(T base, T contrib, T r) {
  return head_value(base, contrib, kRes ? r : T{}, kRelu, kAfter);
}

// The sum of a block's lanes, in lane order.
template <typename T, typename V>
CP_ALWAYS_INLINE T lane_sum(V v) {
  T lanes[sizeof(V) / sizeof(T)];
  std::memcpy(lanes, &v, sizeof(V));
  T sum = T(0);
  for (size_t l = 0; l < sizeof(V) / sizeof(T); ++l) sum += lanes[l];
  return sum;
}

// logits[k] = sum_f fcw[k, f] * pooled[f] / P + fcb[k]. Each dot product runs over blocks V of
// output channels in increasing order, then sums the lanes in order, then adds the remainder.
template <typename T, typename V>
CP_ALWAYS_INLINE void head_linear(const Head<T>& h, const T* __restrict pooled, T* __restrict mean,
                                  T* __restrict logits) {
  constexpr int64_t L = sizeof(V) / sizeof(T);
  const int64_t F = h.F, K = h.K, Fv = F - F % L;
  for (int64_t f = 0; f < F; ++f) mean[f] = head_mean(pooled[f], h.P);
  for (int64_t k = 0; k < K; ++k) {
    const T* __restrict w = h.fcw + k * F;
    V acc{};
    for (int64_t f0 = 0; f0 < Fv; f0 += L) acc += load<V>(w + f0) * load<V>(mean + f0);
    T sum = lane_sum<T, V>(acc);
    for (int64_t f = Fv; f < F; ++f) sum += w[f] * mean[f];
    logits[k] = sum + h.fcb[k];
  }
}

// The per-image values every ablation of image b starts from: base and residual transposed to
// [P][F], the unablated values v0, their pooled sums and logits.
template <typename T, int kBytes, bool kRelu, bool kAfter, bool kRes>
CP_ALWAYS_INLINE void prepare_image(const Head<T>& h, Scratch<T>& s, int64_t b) {
  const int64_t F = h.F, P = h.P;
  const T* zb = h.z + b * F * P;
  const T* rb = h.has_res ? h.res + b * F * P : nullptr;
  T* __restrict base = s.base.data();
  for (int64_t f = 0; f < F; ++f) {
    const T sc = h.scale[f], sh = h.shift[f];
    const T* __restrict zf = zb + f * P;
    if (rb != nullptr) {
      const T* __restrict rf = rb + f * P;
      for (int64_t p = 0; p < P; ++p) base[p * F + f] = head_base(zf[p], sc, sh, rf[p], kRelu);
      if (kRes)
        for (int64_t p = 0; p < P; ++p) s.res[p * F + f] = rf[p];
    } else {
      for (int64_t p = 0; p < P; ++p) base[p * F + f] = head_base(zf[p], sc, sh, T(0), kRelu);
    }
  }
  T* __restrict v0 = s.v0.data();
  T* __restrict pooled0 = s.pooled0.data();
  const T* __restrict res = kRes ? s.res.data() : nullptr;
  for (int64_t f = 0; f < F; ++f) pooled0[f] = T(0);
  for (int64_t p = 0; p < P; ++p)
    for (int64_t f = 0; f < F; ++f) {
      const T v = mode_value<T, kRelu, kAfter, kRes>(base[p * F + f], T(0),
                                                     kRes ? res[p * F + f] : T(0));
      v0[p * F + f] = v;
      pooled0[f] += v;
    }
  head_linear<T, BlockOf<T, kBytes>>(h, pooled0, s.mean.data(), s.logits0.data());
  s.image = b;
}

// One touched position t for the output channels f0 .. f0 + NV * lanes - 1: the removed
// contribution accumulates in registers over the position's (tap, value) entries, then
// pool += mode_value(base, contribution, r) - v0.
template <typename T, typename V, int NV, bool kRelu, bool kAfter, bool kRes>
CP_ALWAYS_INLINE void pool_position(const Head<T>& h, const Scratch<T>& s, const T* __restrict wt,
                                    int64_t t, int64_t f0, V* pool) {
  constexpr int64_t L = sizeof(V) / sizeof(T);
  const int64_t p = s.positions[t], n = s.count[p];
  const int32_t* off = s.entry_offset.data() + p * h.taps;
  const T* val = s.entry_value.data() + p * h.taps;
  V acc[NV];
  for (int u = 0; u < NV; ++u) acc[u] = V{};
  for (int64_t e = 0; e < n; ++e) {
    const T v = val[e];
    const T* __restrict w = wt + off[e] + f0;
    for (int u = 0; u < NV; ++u) acc[u] += v * load<V>(w + u * L);
  }
  const int64_t at = p * h.F + f0;
  for (int u = 0; u < NV; ++u) {
    const V r = kRes ? load<V>(s.res.data() + at + u * L) : V{};
    pool[u] += mode_value<V, kRelu, kAfter, kRes>(load<V>(s.base.data() + at + u * L), acc[u], r) -
               load<V>(s.v0.data() + at + u * L);
  }
}

// pooled[f0 : f0 + NV * lanes] = pooled0 + the change over all touched positions, for NV
// blocks V of output channels (V = T: single channels, for the remainder of F). Positions
// alternate between two accumulator chains.
template <typename T, typename V, int NV, bool kRelu, bool kAfter, bool kRes>
CP_ALWAYS_INLINE void pool_block(const Head<T>& h, const Scratch<T>& s, const T* __restrict wt,
                                 int64_t nt, int64_t f0, T* __restrict pooled) {
  constexpr int64_t L = sizeof(V) / sizeof(T);
  V even[NV], odd[NV];
  for (int u = 0; u < NV; ++u) even[u] = odd[u] = V{};
  int64_t t = 0;
  for (; t + 1 < nt; t += 2) {
    pool_position<T, V, NV, kRelu, kAfter, kRes>(h, s, wt, t, f0, even);
    pool_position<T, V, NV, kRelu, kAfter, kRes>(h, s, wt, t + 1, f0, odd);
  }
  if (t < nt) pool_position<T, V, NV, kRelu, kAfter, kRes>(h, s, wt, t, f0, even);
  for (int u = 0; u < NV; ++u)
    store<V>(pooled + f0 + u * L, load<V>(s.pooled0.data() + f0 + u * L) + (even[u] + odd[u]));
}

// Logits of image b with channel channels[j] removed, into out[j, b].
template <typename T, int kBytes, bool kRelu, bool kAfter, bool kRes>
CP_ALWAYS_INLINE void ablate_one(const Head<T>& h, Scratch<T>& s, int64_t j, int64_t b) {
  const int64_t F = h.F, K = h.K, taps = h.taps;
  const ConvGeom& g = h.g;
  T* __restrict out = h.out + (j * h.B + b) * K;
  const int64_t c = h.ch[j];
  const T* plane = c >= 0 ? h.a + (b * h.C + c) * g.H * g.W : nullptr;
  int64_t n = 0;
  if (plane != nullptr) {
    int32_t* __restrict nzy = s.nzy.data();
    int32_t* __restrict nzx = s.nzx.data();
    const int64_t H = g.H, W = g.W;
    for (int64_t iy = 0; iy < H; ++iy)
      for (int64_t ix = 0; ix < W; ++ix) {  // branch-free compaction of the nonzero pixels
        nzy[n] = static_cast<int32_t>(iy);
        nzx[n] = static_cast<int32_t>(ix);
        n += plane[iy * W + ix] != T(0) ? 1 : 0;  // NaN counts as nonzero and propagates
      }
  }
  if (n == 0) {  // nothing removed: the unablated logits
    std::memcpy(out, s.logits0.data(), K * sizeof(T));
    return;
  }
  // Gather, per output position, the (tap, input value) pairs of the nonzero input pixels that
  // reach it, in pixel order: the only terms of the removed contribution that are not zero.
  int32_t* __restrict count = s.count.data();
  int32_t* __restrict entry_offset = s.entry_offset.data();
  T* __restrict entry_value = s.entry_value.data();
  uint64_t* __restrict touched = s.touched.data();
  const int32_t* __restrict rows = h.rows;
  const int32_t* __restrict cols = h.cols;
  const int64_t W = g.W, kh = g.kh, kw = g.kw;
  for (int64_t t = 0; t < n; ++t) {
    const int64_t iy = s.nzy[t], ix = s.nzx[t];
    const T v = plane[iy * W + ix];
    const int32_t* ry = rows + iy * kh * 2;
    const int32_t* cx = cols + ix * kw * 2;
    const int64_t ny = h.row_count[iy], nx = h.col_count[ix];
    for (int64_t u = 0; u < ny; ++u) {
      const int32_t row_off = ry[2 * u], row_p = ry[2 * u + 1];
      for (int64_t e = 0; e < nx; ++e) {
        const int64_t p = row_p + cx[2 * e + 1];
        const int64_t slot = p * taps + count[p]++;
        entry_offset[slot] = row_off + cx[2 * e];
        entry_value[slot] = v;
        touched[p >> 6] |= uint64_t(1) << (p & 63);
      }
    }
  }
  // The touched positions, ordered by their number of entries, then by position: the entry
  // loop below then runs with the same trip count many times in a row (no branch misses).
  int64_t nt = 0;
  int32_t* unsorted = s.unsorted.data();
  int32_t* group = s.group.data();
  std::fill_n(group, taps + 2, 0);
  const int64_t words = (h.P + 63) / 64;
  for (int64_t wd = 0; wd < words; ++wd) {
    uint64_t bits = touched[wd];
    touched[wd] = 0;
    while (bits != 0) {
      const int32_t p = static_cast<int32_t>(wd * 64 + std::countr_zero(bits));
      unsorted[nt++] = p;
      ++group[count[p] + 1];
      bits &= bits - 1;
    }
  }
  for (int64_t c = 1; c <= taps; ++c) group[c + 1] += group[c];
  for (int64_t t = 0; t < nt; ++t) s.positions[group[count[unsorted[t]]]++] = unsorted[t];
  const T* wt = h.wt + j * taps * F;
  T* pooled = s.pooled.data();
  // Output channels in groups of kGroup blocks (their accumulators fit in registers), then
  // single blocks, then single channels.
  using V = BlockOf<T, kBytes>;
  constexpr int64_t lanes = sizeof(V) / sizeof(T);
  constexpr int kGroup = 4;
  int64_t f0 = 0;
  for (; f0 + kGroup * lanes <= F; f0 += kGroup * lanes)
    pool_block<T, V, kGroup, kRelu, kAfter, kRes>(h, s, wt, nt, f0, pooled);
  for (; f0 + lanes <= F; f0 += lanes)
    pool_block<T, V, 1, kRelu, kAfter, kRes>(h, s, wt, nt, f0, pooled);
  for (; f0 < F; ++f0) pool_block<T, T, 1, kRelu, kAfter, kRes>(h, s, wt, nt, f0, pooled);
  for (int64_t t = 0; t < nt; ++t) count[s.positions[t]] = 0;
  head_linear<T, V>(h, pooled, s.mean.data(), out);
}

// Pairs i in [begin, end), image-major (i = b * m + j), so each image is prepared once per task.
template <typename T, int kBytes, bool kRelu, bool kAfter, bool kRes>
CP_ALWAYS_INLINE void run_pairs(const Head<T>& h, Scratch<T>& s, int64_t begin, int64_t end) {
  for (int64_t i = begin; i < end; ++i) {
    const int64_t b = i / h.m, j = i - b * h.m;
    if (s.image != b) prepare_image<T, kBytes, kRelu, kAfter, kRes>(h, s, b);
    ablate_one<T, kBytes, kRelu, kAfter, kRes>(h, s, j, b);
  }
}

enum class Isa { kDefault, kAvx2, kAvx512 };

template <typename T, bool kRelu, bool kAfter, bool kRes>
void run_default(const Head<T>& h, Scratch<T>& s, int64_t begin, int64_t end) {
  run_pairs<T, 16, kRelu, kAfter, kRes>(h, s, begin, end);
}

#if CP_X86_DISPATCH
template <typename T, bool kRelu, bool kAfter, bool kRes>
__attribute__((target("avx2,fma"))) void run_avx2(const Head<T>& h, Scratch<T>& s,
                                                    int64_t begin, int64_t end) {
  run_pairs<T, 32, kRelu, kAfter, kRes>(h, s, begin, end);
}

template <typename T, bool kRelu, bool kAfter, bool kRes>
__attribute__((target("avx512f,avx512vl,avx512dq,avx512bw,avx2,fma")))
void run_avx512(const Head<T>& h, Scratch<T>& s, int64_t begin, int64_t end) {
  run_pairs<T, 64, kRelu, kAfter, kRes>(h, s, begin, end);
}
#endif

template <typename T, bool kRelu, bool kAfter, bool kRes>
void run_isa(Isa isa, const Head<T>& h, Scratch<T>& s, int64_t begin, int64_t end) {
  switch (isa) {
#if CP_X86_DISPATCH
    case Isa::kAvx512:
      return run_avx512<T, kRelu, kAfter, kRes>(h, s, begin, end);
    case Isa::kAvx2:
      return run_avx2<T, kRelu, kAfter, kRes>(h, s, begin, end);
#endif
    default:
      return run_default<T, kRelu, kAfter, kRes>(h, s, begin, end);
  }
}

// The activation flags in canonical form: without the consumer's ReLU the residual is part of
// the base; with it but no residual, a second ReLU changes nothing.
template <typename T>
void run(Isa isa, const Head<T>& h, Scratch<T>& s, int64_t begin, int64_t end) {
  if (!h.relu) {
    if (h.relu_after) return run_isa<T, false, true, false>(isa, h, s, begin, end);
    return run_isa<T, false, false, false>(isa, h, s, begin, end);
  }
  if (!h.has_res) return run_isa<T, true, false, false>(isa, h, s, begin, end);
  if (h.relu_after) return run_isa<T, true, true, true>(isa, h, s, begin, end);
  return run_isa<T, true, false, true>(isa, h, s, begin, end);
}

Isa best_isa() {
#if CP_X86_DISPATCH
  static const Isa best = [] {
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512bw"))
      return Isa::kAvx512;
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return Isa::kAvx2;
    return Isa::kDefault;
  }();
  return best;
#else
  return Isa::kDefault;
#endif
}

// The instruction set for this call: the best this CPU has, or CARPRUNE_CPU_ISA.
Isa call_isa() {
  const Isa best = best_isa();
  const char* env = std::getenv("CARPRUNE_CPU_ISA");
  if (env == nullptr || *env == '\0') return best;
  const std::string want(env);
  Isa isa;
  if (want == "default") {
    isa = Isa::kDefault;
  } else if (want == "avx2") {
    isa = Isa::kAvx2;
  } else if (want == "avx512") {
    isa = Isa::kAvx512;
  } else {
    TORCH_CHECK(false, "carprune: CARPRUNE_CPU_ISA must be default, avx2 or avx512, got '",
                want, "'");
  }
  TORCH_CHECK(static_cast<int>(isa) <= static_cast<int>(best), "carprune: CARPRUNE_CPU_ISA=",
              want, " but this CPU (or build) does not support it");
  return isa;
}

at::Tensor ablate_conv_head_cpu(const at::Tensor& a_in, const at::Tensor& weight_in,
                                const at::Tensor& z_in, const at::Tensor& scale_in,
                                const at::Tensor& shift_in, const at::Tensor& channels_in,
                                at::IntArrayRef stride, at::IntArrayRef padding,
                                at::IntArrayRef dilation, bool relu,
                                const std::optional<at::Tensor>& residual_in, bool relu_after,
                                const at::Tensor& fc_weight_in,
                                const std::optional<at::Tensor>& fc_bias_in) {
  const ConvGeom g = check_ablate_conv_head(a_in, weight_in, z_in, scale_in, shift_in,
                                            channels_in, stride, padding, dilation, residual_in,
                                            fc_weight_in, fc_bias_in);
  const auto a = a_in.contiguous(), weight = weight_in.contiguous(), z = z_in.contiguous();
  const auto scale = scale_in.contiguous(), shift = shift_in.contiguous();
  const auto channels = channels_in.contiguous();
  const auto fc_weight = fc_weight_in.contiguous();
  const at::Tensor residual = residual_in.has_value() ? residual_in->contiguous() : at::Tensor();
  const int64_t B = a.size(0), C = a.size(1), F = weight.size(0), m = channels.size(0);
  const int64_t K = fc_weight.size(0), P = g.Ho * g.Wo, taps = g.kh * g.kw;
  auto out = at::empty({m, B, K}, a.options());
  if (out.numel() == 0) return out;
  const Isa isa = call_isa();
  const int64_t* ch = channels.data_ptr<int64_t>();
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "carprune_ablate_conv_head_cpu", [&] {
    using T = scalar_t;
    const T* wp = weight.data_ptr<T>();
    const T* scp = scale.data_ptr<T>();
    // Per call: the removed channels' weights with the BatchNorm scale folded in, [m, taps, F].
    std::vector<T> wt(m * taps * F, T(0));
    for (int64_t j = 0; j < m; ++j) {
      if (ch[j] < 0) continue;
      for (int64_t t = 0; t < taps; ++t)
        for (int64_t f = 0; f < F; ++f)
          wt[(j * taps + t) * F + f] = head_weight(scp[f], wp[(f * C + ch[j]) * taps + t]);
    }
    const T* fw = fc_weight.data_ptr<T>();
    std::vector<T> fcb(K, T(0));
    if (fc_bias_in.has_value()) {
      const auto bias = fc_bias_in->contiguous();
      std::copy_n(bias.data_ptr<T>(), K, fcb.begin());
    }
    std::vector<int32_t> rows, row_count, cols, col_count;
    tap_table(g.H, g.kh, g.Ho, g.sh, g.ph, g.dh, g.kw * F, g.Wo, rows, row_count);
    tap_table(g.W, g.kw, g.Wo, g.sw, g.pw, g.dw, F, 1, cols, col_count);
    const Head<T> h{a.data_ptr<T>(), z.data_ptr<T>(),
                    residual.defined() ? residual.data_ptr<T>() : nullptr, wt.data(), scp,
                    shift.data_ptr<T>(), fw, fcb.data(), ch, out.data_ptr<T>(),
                    rows.data(), row_count.data(), cols.data(), col_count.data(),
                    B, C, F, m, K, P, taps, g, relu, relu_after, residual.defined()};
    // Grain: enough pairs per task that preparing an image is shared by its ablations.
    const int64_t grain = std::max<int64_t>(1, std::min<int64_t>(m, 65536 / (F * P + 1)));
    at::parallel_for(0, m * B, grain, [&](int64_t begin, int64_t end) {
      Scratch<T> s(h);
      run(isa, h, s, begin, end);
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(carprune, CPU, m) { m.impl("ablate_conv_head", &ablate_conv_head_cpu); }

}  // namespace carprune
