// Shared by the CPU and CUDA kernels: input checks (the same rules as the Python references), the
// Gaussian window, reflect indexing.
#pragma once

#include <ATen/ATen.h>

#include <cmath>
#include <vector>

namespace sagfast {

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16 || t == at::kDouble;
}

inline void check_attention_mass(const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4, "attention_mass: q and k must be [B, H, N, D]");
  TORCH_CHECK(q.sizes() == k.sizes(), "attention_mass: q and k must have one shape");
  TORCH_CHECK(lse.dim() == 3 && lse.size(0) == q.size(0) && lse.size(1) == q.size(1) && lse.size(2) == q.size(2),
              "attention_mass: lse must be [B, H, N]");
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && is_float_type(q.scalar_type()),
              "attention_mass: q and k must share one floating dtype");
  TORCH_CHECK(is_float_type(lse.scalar_type()), "attention_mass: lse must be floating point");
  TORCH_CHECK(q.device() == k.device() && q.device() == lse.device(), "attention_mass: inputs on different devices");
}

inline void check_degrade(const at::Tensor& x0, const at::Tensor& mask, const at::Tensor& eps, const at::Tensor& abar,
                          int64_t kernel_size, double sigma) {
  TORCH_CHECK(x0.dim() == 4, "degrade: x0 must be [B, C, H, W]");
  TORCH_CHECK(eps.sizes() == x0.sizes() && eps.scalar_type() == x0.scalar_type(),
              "degrade: eps must have x0's shape and dtype");
  TORCH_CHECK(is_float_type(x0.scalar_type()), "degrade: x0 must be floating point");
  TORCH_CHECK(mask.dim() == 3 && mask.size(0) == x0.size(0) && mask.size(1) <= x0.size(2) && mask.size(2) <= x0.size(3),
              "degrade: mask must be [B, h, w] with h <= H, w <= W");
  TORCH_CHECK(abar.dim() == 1 && abar.size(0) == x0.size(0), "degrade: abar must be [B]");
  TORCH_CHECK(kernel_size >= 1 && kernel_size % 2 == 1, "degrade: kernel_size must be odd and >= 1");
  TORCH_CHECK(x0.size(2) > kernel_size / 2 && x0.size(3) > kernel_size / 2,
              "degrade: reflect padding needs H and W > kernel_size // 2");
  TORCH_CHECK(sigma > 0, "degrade: sigma must be > 0");
  TORCH_CHECK(x0.device() == mask.device() && x0.device() == eps.device() && x0.device() == abar.device(),
              "degrade: inputs on different devices");
}

inline void check_combine(const at::Tensor& o, at::TensorList pos, at::TensorList neg, const at::Tensor& scales) {
  TORCH_CHECK(!pos.empty() && pos.size() == neg.size(), "combine: one positive and one negative tensor per term");
  TORCH_CHECK(scales.dim() == 2 && scales.size(0) == static_cast<int64_t>(pos.size()) && scales.size(1) == pos[0].size(0) &&
                  scales.scalar_type() == at::kFloat && scales.device() == o.device(),
              "combine: scales must be fp32 [terms, B] on o's device");
  for (size_t t = 0; t < pos.size(); ++t) {
    TORCH_CHECK(pos[t].sizes() == pos[0].sizes() && neg[t].sizes() == pos[0].sizes(),
                "combine: every term's tensors must share one shape");
    TORCH_CHECK(pos[t].scalar_type() == o.scalar_type() && neg[t].scalar_type() == o.scalar_type(),
                "combine: every tensor must have o's dtype");
    TORCH_CHECK(pos[t].device() == o.device() && neg[t].device() == o.device(), "combine: inputs on different devices");
  }
  TORCH_CHECK(is_float_type(o.scalar_type()), "combine: o must be floating point");
  const auto& g = pos[0];
  TORCH_CHECK(o.dim() == g.dim() && g.dim() >= 1 && g.size(0) > 0 && o.size(0) % g.size(0) == 0 &&
                  o.sizes().slice(1) == g.sizes().slice(1),
              "combine: o must be [n*B, ...] with the terms' trailing shape");
}

// The samples of sagfast.ops.degrade.gaussian_weights: linspace(-half, half, K), exp(-x^2 / 2 sigma^2),
// normalised to sum 1, in fp32.
inline std::vector<float> gaussian_weights(int64_t kernel_size, double sigma) {
  std::vector<float> w(kernel_size);
  const float half = static_cast<float>(kernel_size - 1) * 0.5f;
  const float s = static_cast<float>(sigma);
  float sum = 0.0f;
  for (int64_t t = 0; t < kernel_size; ++t) {
    const float x = (static_cast<float>(t) - half) / s;
    w[t] = std::exp(-0.5f * x * x);
    sum += w[t];
  }
  for (auto& v : w) v /= sum;
  return w;
}

// Reflect padding index ("reflect": the edge is not repeated). Valid for -n < i < 2n - 1.
#ifdef __CUDACC__
__host__ __device__
#endif
inline int64_t reflect(int64_t i, int64_t n) {
  i = i < 0 ? -i : i;
  return i > n - 1 ? 2 * (n - 1) - i : i;
}

}  // namespace sagfast
