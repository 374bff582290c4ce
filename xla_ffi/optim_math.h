// Per-element update rules of the fused sparse optimizers, shared by the CPU
// and CUDA kernels so both paths compute the same function. All math is in
// float32 whatever the table's and slots' storage types. No XLA, no nanobind.
//
// Each rule is a small struct: its constructor takes the constant
// hyperparameters (the FFI attributes of its `sok_*_update` target, in
// signature order; `FromConsts` takes the same from the float list of the
// fused target), `Bind(hparams)` reads the traced ones (learning rate first)
// from the float32 hparams buffer where the kernel runs (on the device for
// CUDA, so nothing is copied to the host), and `operator()` updates one
// element of the table and its slots in place (float32 values: the kernels
// load 16-bit tables and slots to float32 and round the results back).
// kSlots says how many slot arrays the rule uses (0, 1 or 2), each [R, D]
// unless kPerRow (one per row, [R]); unused slot references are dummies;
// kConsts says how many constants it takes. The formulas follow optax (SGD,
// Adagrad, Adam) and TF/Keras (FTRL) term by term, so the pure-JAX reference
// in sok_jax/ops/reference.py and these kernels agree to float rounding.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "embed_math.h"  // SOK_HD

namespace sok {

// optax.sgd: p + (-lr * g).
struct SgdRule {
  static constexpr int kSlots = 0;
  static constexpr bool kPerRow = false;
  static constexpr int kHparams = 1;  // learning_rate
  static constexpr int kConsts = 0;
  float lr = 0.f;

  SOK_HD static SgdRule FromConsts(const float*) { return SgdRule(); }
  SOK_HD void Bind(const float* hp) { lr = hp[0]; }
  SOK_HD void operator()(float& w, float&, float&, float g) const {
    w = w + (-lr * g);
  }
};

// optax.adagrad (scale_by_rss): acc += g^2; p -= lr * g * rsqrt(acc + eps),
// with the step zero where acc is not positive.
SOK_HD float AdagradScale(float acc, float eps) {
  return acc > 0.f ? 1.f / sqrtf(acc + eps) : 0.f;
}

struct AdagradRule {
  static constexpr int kSlots = 1;  // accumulator
  static constexpr bool kPerRow = false;
  static constexpr int kHparams = 1;  // learning_rate
  static constexpr int kConsts = 1;  // eps
  float lr = 0.f;
  float eps;

  SOK_HD explicit AdagradRule(float eps_) : eps(eps_) {}
  SOK_HD static AdagradRule FromConsts(const float* c) {
    return AdagradRule(c[0]);
  }
  SOK_HD void Bind(const float* hp) { lr = hp[0]; }
  SOK_HD void operator()(float& w, float& acc, float&, float g) const {
    acc = g * g + acc;
    w = w + (-lr * (AdagradScale(acc, eps) * g));
  }
};

// Row-wise Adagrad (FBGEMM's accumulator rule, optax's Adagrad step): one
// accumulator per row, acc += mean_d(g_d^2); p_d -= lr * g_d * rsqrt(acc +
// eps). With D == 1 this is exactly AdagradRule. The mean is computed by the
// caller (it needs the whole row); this applies the step to one element.
// Not element-wise (no operator()): every caller reduces the row first.
struct RowwiseAdagradRule {
  static constexpr int kSlots = 1;  // accumulator
  static constexpr bool kPerRow = true;
  static constexpr int kHparams = 1;  // learning_rate
  static constexpr int kConsts = 1;  // eps
  float lr = 0.f;
  float eps;

  SOK_HD explicit RowwiseAdagradRule(float eps_) : eps(eps_) {}
  SOK_HD static RowwiseAdagradRule FromConsts(const float* c) {
    return RowwiseAdagradRule(c[0]);
  }
  SOK_HD void Bind(const float* hp) { lr = hp[0]; }
  // The new accumulator from the old one and the row's sum of g^2.
  SOK_HD float Accumulate(float acc, float sum_sq, int64_t dim) const {
    return sum_sq / static_cast<float>(dim) + acc;
  }
  SOK_HD float Step(float w, float g, float scale) const {
    return w + (-lr * (scale * g));
  }
};

// Lazy Adam (optax.adam on the touched rows only, as TF LazyAdam and SOK):
//   m = (1-b1) g + b1 m;  v = (1-b2) g^2 + b2 v
//   p -= lr * (m / bc1) / (sqrt(v / bc2 + eps_root) + eps),  bck = 1 - bk^step
// `step` (hparams[1]) is the 1-based count of this update, as optax's count
// after its increment.
struct AdamRule {
  static constexpr int kSlots = 2;  // m, v
  static constexpr bool kPerRow = false;
  static constexpr int kHparams = 2;  // learning_rate, step
  static constexpr int kConsts = 4;  // b1, b2, eps, eps_root
  float lr = 0.f;
  float bc1 = 1.f;
  float bc2 = 1.f;
  float b1, b2, eps, eps_root;

  SOK_HD AdamRule(float b1_, float b2_, float eps_, float eps_root_)
      : b1(b1_), b2(b2_), eps(eps_), eps_root(eps_root_) {}
  SOK_HD static AdamRule FromConsts(const float* c) {
    return AdamRule(c[0], c[1], c[2], c[3]);
  }
  SOK_HD void Bind(const float* hp) {
    lr = hp[0];
    bc1 = 1.f - powf(b1, hp[1]);
    bc2 = 1.f - powf(b2, hp[1]);
  }
  SOK_HD void operator()(float& w, float& m, float& v, float g) const {
    m = (1.f - b1) * g + b1 * m;
    v = (1.f - b2) * (g * g) + b2 * v;
    float m_hat = m / bc1;
    float v_hat = v / bc2;
    w = w + (-lr * (m_hat / (sqrtf(v_hat + eps_root) + eps)));
  }
};

// FTRL-Proximal as tf.keras.optimizers.Ftrl (TF's ApplyFtrlV2):
//   g' = g + 2 l2_shrinkage p;  n = acc + g^2
//   z += g' - (n^-lrp - acc^-lrp) / lr * p
//   q = n^-lrp / lr + 2 (l2 + beta / (2 lr))
//   p = (clip(z, -l1, l1) - z) / q;  acc = n
SOK_HD float FtrlPow(float x, float lr_power) {
  return lr_power == -0.5f ? sqrtf(x) : powf(x, -lr_power);
}

struct FtrlRule {
  static constexpr int kSlots = 2;  // accumulator, linear
  static constexpr bool kPerRow = false;
  static constexpr int kHparams = 1;  // learning_rate
  static constexpr int kConsts = 5;  // lr_power, l1, l2, l2_shrinkage, beta
  float lr = 0.f;
  float lr_power, l1, l2, l2_shrinkage, beta;

  SOK_HD FtrlRule(float lr_power_, float l1_, float l2_, float l2_shrinkage_,
                  float beta_)
      : lr_power(lr_power_), l1(l1_), l2(l2_), l2_shrinkage(l2_shrinkage_),
        beta(beta_) {}
  SOK_HD static FtrlRule FromConsts(const float* c) {
    return FtrlRule(c[0], c[1], c[2], c[3], c[4]);
  }
  SOK_HD void Bind(const float* hp) { lr = hp[0]; }
  SOK_HD void operator()(float& w, float& acc, float& z, float g) const {
    float l2_reg = l2 + beta / (2.f * lr);
    float g_shrunk = g + 2.f * l2_shrinkage * w;
    float acc_new = acc + g * g;
    float p_new = FtrlPow(acc_new, lr_power);
    float p_old = FtrlPow(acc, lr_power);
    z = z + (g_shrunk - (p_new - p_old) / lr * w);
    float quadratic = p_new / lr + 2.f * l2_reg;
    float clipped = fminf(fmaxf(z, -l1), l1);
    w = (clipped - z) / quadratic;
    acc = acc_new;
  }
};

// The rules by the id the fused backward+update target takes
// (sok_embed_bwd_update), with their constant hyperparameters from a float
// list in the order of the Python wrapper (sok_jax/ops/embed_ops.py RULES),
// which is the order of each rule's constructor:
//   0 sgd: -;  1 adagrad: eps;  2 adam: b1, b2, eps, eps_root;
//   3 ftrl: learning_rate_power, l1, l2, l2_shrinkage, beta;
//   4 rowwise_adagrad: eps (kPerRow: its callers reduce each row first).
// Calls f(rule) and returns true, or returns false for an unknown id or too
// few constants.
enum RuleId : int32_t {
  kRuleSgd = 0,
  kRuleAdagrad = 1,
  kRuleAdam = 2,
  kRuleFtrl = 3,
  kRuleRowwiseAdagrad = 4,
};

template <typename Rule, typename F>
bool VisitWithConsts(const float* c, size_t nc, F&& f) {
  if constexpr (Rule::kConsts > 0)
    if (nc < static_cast<size_t>(Rule::kConsts)) return false;
  f(Rule::FromConsts(c));
  return true;
}

template <typename F>
bool VisitRule(int32_t id, const float* c, size_t nc, F&& f) {
  switch (id) {
    case kRuleSgd:
      return VisitWithConsts<SgdRule>(c, nc, f);
    case kRuleAdagrad:
      return VisitWithConsts<AdagradRule>(c, nc, f);
    case kRuleAdam:
      return VisitWithConsts<AdamRule>(c, nc, f);
    case kRuleFtrl:
      return VisitWithConsts<FtrlRule>(c, nc, f);
    case kRuleRowwiseAdagrad:
      return VisitWithConsts<RowwiseAdagradRule>(c, nc, f);
    default:
      return false;
  }
}

// How many unique rows to update: num_unique clamped to [0, capacity].
SOK_HD int64_t ClampCount(int32_t num_unique, int64_t capacity) {
  int64_t c = num_unique < 0 ? 0 : static_cast<int64_t>(num_unique);
  return c < capacity ? c : capacity;
}

}  // namespace sok
