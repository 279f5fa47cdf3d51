// sagfast CUDA kernels for the ops defined in sagfast_ops.cpp. Compiled only when torch is a CUDA
// build and a CUDA toolkit is present (setup.py). On CUDA tensors "auto" prefers the Triton kernels;
// these are the "cpp" backend's CUDA path for degrade and combine: simple kernels (fp32 math, one
// launch, the current stream, no host synchronization, so they can be captured in a CUDA graph). The
// attention mass has no CUDA C++ kernel: Triton's is the one on CUDA (docs/design.md says why).
//
// Measured on an NVIDIA H200 (`python -m bench kernels --device cuda`): 0.02-0.03 ms each at the
// step's sizes, the fastest of the backends there.

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>

#include "sagfast_common.h"

namespace sagfast {
namespace {

constexpr int kMaxTaps = 31;

struct Taps {
  float w[kMaxTaps];
};

// One thread per output element: the separable Gaussian (row sums inside, column sum outside, the
// reference's order) over reflect-padded neighbours read from global memory (cached), the blend with
// the index-upsampled mask, and the re-noise. One pass: no intermediate blurred tensor.
template <typename scalar_t>
__global__ void degrade_kernel(const scalar_t* __restrict__ x0, const bool* __restrict__ mask,
                               const scalar_t* __restrict__ eps, const float* __restrict__ abar,
                               scalar_t* __restrict__ out, Taps taps, int K,
                               int64_t C, int64_t Hh, int64_t W, int64_t mh, int64_t mw,
                               int64_t xsb, int64_t xsc, int64_t xsh, int64_t xsw,
                               int64_t msb, int64_t msh, int64_t msw,
                               int64_t esb, int64_t esc, int64_t esh, int64_t esw, int64_t total) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= total) return;
  const int64_t j = idx % W, i = (idx / W) % Hh, c = (idx / (W * Hh)) % C, b = idx / (W * Hh * C);
  const scalar_t* xp = x0 + b * xsb + c * xsc;
  const int pad = K / 2;
  const float xv = static_cast<float>(xp[i * xsh + j * xsw]);
  float val = xv;
  if (mask[b * msb + (i * mh / Hh) * msh + (j * mw / W) * msw]) {
    float blurred = 0.f;
    for (int dy = 0; dy < K; ++dy) {
      const int64_t r = reflect(i + dy - pad, Hh);
      float row = 0.f;
      for (int dx = 0; dx < K; ++dx) row += taps.w[dx] * static_cast<float>(xp[r * xsh + reflect(j + dx - pad, W) * xsw]);
      blurred += taps.w[dy] * row;
    }
    val = blurred;
  }
  const float a = abar[b];
  const float e = static_cast<float>(eps[b * esb + c * esc + i * esh + j * esw]);
  out[idx] = static_cast<scalar_t>(sqrtf(a) * val + sqrtf(1.f - a) * e);
}

// out[k * M + i] = o[k * M + i] + sum_t scales[t, row(i)] * (pos[t, i] - neg[t, i]), the terms stacked
// ([T, M]: any number of them); grid-stride over i, the term sum computed once per i and reused for
// every chunk k.
template <typename scalar_t>
__global__ void combine_kernel(const scalar_t* __restrict__ o, scalar_t* __restrict__ out, const scalar_t* __restrict__ pos,
                               const scalar_t* __restrict__ neg, const float* __restrict__ scales, int T, int64_t B,
                               int64_t M, int64_t chunks) {
  const int64_t per_row = M / B;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < M;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t row = i / per_row;
    float t = 0.f;
    for (int s = 0; s < T; ++s)
      t += scales[s * B + row] * (static_cast<float>(pos[s * M + i]) - static_cast<float>(neg[s * M + i]));
    for (int64_t kk = 0; kk < chunks; ++kk) out[kk * M + i] = static_cast<scalar_t>(static_cast<float>(o[kk * M + i]) + t);
  }
}

// One thread per element and no grid-stride loop: the grid must cover every element (gridDim.x may
// reach 2^31 - 1), never be capped.
inline unsigned blocks_for(int64_t n, int threads) {
  const int64_t blocks = (n + threads - 1) / threads;
  TORCH_CHECK(blocks <= INT32_MAX, "sagfast (cuda): ", n, " elements are more than one launch covers");
  return static_cast<unsigned>(blocks);
}

}  // namespace

at::Tensor degrade_cuda(const at::Tensor& x0, const at::Tensor& mask_in, const at::Tensor& eps, const at::Tensor& abar_in,
                        int64_t kernel_size, double sigma) {
  check_degrade(x0, mask_in, eps, abar_in, kernel_size, sigma);
  TORCH_CHECK(kernel_size <= kMaxTaps, "degrade (cuda): kernel_size must be <= ", kMaxTaps);
  const c10::cuda::CUDAGuard guard(x0.device());
  const at::Tensor mask = mask_in.scalar_type() == at::kBool ? mask_in : mask_in.ne(0);
  const at::Tensor abar = abar_in.to(at::kFloat).contiguous();
  auto out = at::empty_like(x0, at::MemoryFormat::Contiguous);
  const int64_t total = out.numel();
  if (total == 0) return out;
  Taps taps{};
  const auto w = gaussian_weights(kernel_size, sigma);  // host-side: a kernel argument, graph safe
  for (int64_t t = 0; t < kernel_size; ++t) taps.w[t] = w[t];
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "sagfast_degrade_cuda", [&] {
    degrade_kernel<scalar_t><<<blocks_for(total, 256), 256, 0, stream>>>(
        x0.data_ptr<scalar_t>(), mask.data_ptr<bool>(), eps.data_ptr<scalar_t>(), abar.data_ptr<float>(),
        out.data_ptr<scalar_t>(), taps, static_cast<int>(kernel_size), x0.size(1), x0.size(2), x0.size(3),
        mask.size(1), mask.size(2), x0.stride(0), x0.stride(1), x0.stride(2), x0.stride(3), mask.stride(0),
        mask.stride(1), mask.stride(2), eps.stride(0), eps.stride(1), eps.stride(2), eps.stride(3), total);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

at::Tensor combine_cuda(const at::Tensor& o, at::TensorList pos, at::TensorList neg, const at::Tensor& scales_in) {
  check_combine(o, pos, neg, scales_in);
  const c10::cuda::CUDAGuard guard(o.device());
  const at::Tensor oc = o.contiguous();
  const at::Tensor scales = scales_in.contiguous();
  const at::Tensor stacked_pos = at::stack(pos).contiguous();
  const at::Tensor stacked_neg = at::stack(neg).contiguous();
  auto out = at::empty_like(oc);
  const int64_t M = pos[0].numel(), B = pos[0].size(0);
  if (M == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.scalar_type(), "sagfast_combine_cuda", [&] {
    combine_kernel<scalar_t><<<blocks_for(M, 256), 256, 0, stream>>>(
        oc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), stacked_pos.data_ptr<scalar_t>(), stacked_neg.data_ptr<scalar_t>(),
        scales.data_ptr<float>(), static_cast<int>(pos.size()), B, M, oc.numel() / M);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace sagfast

TORCH_LIBRARY_IMPL(sagfast, CUDA, m) {
  m.impl("degrade", &sagfast::degrade_cuda);
  m.impl("combine", &sagfast::combine_cuda);
}
