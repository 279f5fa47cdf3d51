// sagfast CUDA kernels for the ops defined in sagfast_ops.cpp. Compiled only when torch is a CUDA
// build and a CUDA toolkit is present (setup.py). On CUDA tensors "auto" prefers the Triton kernels;
// these are the "cpp" backend's CUDA path: simple, correct-first kernels (fp32 math, one launch per
// stage, the current stream, no host synchronization, so they can be captured in a CUDA graph).
//
// STATUS: written without a GPU to run them on; they compile only where a CUDA toolkit exists.

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

constexpr int kMaxHeadDim = 256;
constexpr int kQueryTile = 32;
constexpr int kKeysPerBlock = 128;
constexpr int kMaxTaps = 31;
constexpr int kMaxTerms = 4;

// One thread per key j of one (b, h): its key row in a per-thread array (local memory, interleaved
// across threads so that kr[d] accesses coalesce), a tile of kQueryTile query rows staged in shared
// memory by the whole block, and the running sum of exp(q_i . k_j * scale - lse_i) over all queries.
// The [N, N] map never exists. Grid: (cdiv(N, kKeysPerBlock), B * H).
template <typename scalar_t>
__global__ void attention_mass_partial_kernel(const scalar_t* __restrict__ q, const scalar_t* __restrict__ k,
                                              const float* __restrict__ lse, float* __restrict__ part,
                                              int64_t qsb, int64_t qsh, int64_t qsn, int64_t qsd,
                                              int64_t ksb, int64_t ksh, int64_t ksn, int64_t ksd,
                                              int64_t lsb, int64_t lsh, int64_t lsn,
                                              int H, int64_t N, int D, float scale) {
  __shared__ float qs[kQueryTile][kMaxHeadDim];
  __shared__ float ls[kQueryTile];
  const int bh = blockIdx.y, b = bh / H, h = bh % H;
  const int64_t j = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const scalar_t* qb = q + b * qsb + h * qsh;
  const float* lb = lse + b * lsb + h * lsh;

  float kr[kMaxHeadDim];
  if (j < N) {
    const scalar_t* kj = k + b * ksb + h * ksh + j * ksn;
    for (int d = 0; d < D; ++d) kr[d] = static_cast<float>(kj[d * ksd]);
  }
  float acc = 0.f;
  for (int64_t i0 = 0; i0 < N; i0 += kQueryTile) {
    __syncthreads();
    for (int idx = threadIdx.x; idx < kQueryTile * D; idx += blockDim.x) {
      const int r = idx / D, d = idx % D;
      qs[r][d] = (i0 + r < N) ? static_cast<float>(qb[(i0 + r) * qsn + d * qsd]) : 0.f;
    }
    for (int r = threadIdx.x; r < kQueryTile; r += blockDim.x) ls[r] = (i0 + r < N) ? lb[(i0 + r) * lsn] : INFINITY;
    __syncthreads();
    if (j < N) {
      for (int r = 0; r < kQueryTile; ++r) {
        float s = 0.f;
        for (int d = 0; d < D; ++d) s += qs[r][d] * kr[d];
        acc += expf(s * scale - ls[r]);  // rows past N: exp(-inf) = 0
      }
    }
  }
  if (j < N) part[static_cast<int64_t>(bh) * N + j] = acc;
}

// Mean over heads (fixed order: deterministic) and the mask. One thread per (b, j).
__global__ void attention_mass_reduce_kernel(const float* __restrict__ part, float* __restrict__ mass,
                                             bool* __restrict__ mask, int64_t B, int H, int64_t N, float threshold) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= B * N) return;
  const int64_t b = idx / N, j = idx % N;
  float acc = 0.f;
  for (int h = 0; h < H; ++h) acc += part[(b * H + h) * N + j];
  const float m = acc / static_cast<float>(H);
  mass[idx] = m;
  mask[idx] = m > threshold;
}

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

template <typename scalar_t>
struct Terms {
  const scalar_t* pos[kMaxTerms];
  const scalar_t* neg[kMaxTerms];
  float scale[kMaxTerms];
  int n;
};

// out[k * M + i] = o[k * M + i] + sum_t scale_t * (pos_t[i] - neg_t[i]); grid-stride over i, the term
// computed once per i and reused for every chunk k.
template <typename scalar_t>
__global__ void combine_kernel(const scalar_t* __restrict__ o, scalar_t* __restrict__ out, Terms<scalar_t> terms,
                               int64_t M, int64_t chunks) {
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < M;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    float t = 0.f;
    for (int s = 0; s < terms.n; ++s)
      t += terms.scale[s] * (static_cast<float>(terms.pos[s][i]) - static_cast<float>(terms.neg[s][i]));
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

std::tuple<at::Tensor, at::Tensor> attention_mass_cuda(const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse_in,
                                                       double scale, double threshold) {
  check_attention_mass(q, k, lse_in);
  TORCH_CHECK(q.size(3) <= kMaxHeadDim, "attention_mass (cuda): head dim must be <= ", kMaxHeadDim);
  const c10::cuda::CUDAGuard guard(q.device());
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  const at::Tensor lse = lse_in.to(at::kFloat);
  auto part = at::empty({B, H, N}, q.options().dtype(at::kFloat));
  auto mass = at::empty({B, N}, q.options().dtype(at::kFloat));
  auto mask = at::empty({B, N}, q.options().dtype(at::kBool));
  if (B * N == 0) return {mass, mask};
  auto stream = c10::cuda::getCurrentCUDAStream();
  TORCH_CHECK(B * H <= 65535, "attention_mass (cuda): batch * heads must be <= 65535 (the grid's y size), got ", B * H);
  const dim3 grid((N + kKeysPerBlock - 1) / kKeysPerBlock, B * H);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "sagfast_attention_mass_cuda", [&] {
    attention_mass_partial_kernel<scalar_t><<<grid, kKeysPerBlock, 0, stream>>>(
        q.data_ptr<scalar_t>(), k.data_ptr<scalar_t>(), lse.data_ptr<float>(), part.data_ptr<float>(),
        q.stride(0), q.stride(1), q.stride(2), q.stride(3), k.stride(0), k.stride(1), k.stride(2), k.stride(3),
        lse.stride(0), lse.stride(1), lse.stride(2), static_cast<int>(H), N, static_cast<int>(D),
        static_cast<float>(scale));
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  attention_mass_reduce_kernel<<<blocks_for(B * N, 256), 256, 0, stream>>>(
      part.data_ptr<float>(), mass.data_ptr<float>(), mask.data_ptr<bool>(), B, static_cast<int>(H), N,
      static_cast<float>(threshold));
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return {mass, mask};
}

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

at::Tensor combine_cuda(const at::Tensor& o, at::TensorList pos, at::TensorList neg, at::ArrayRef<double> scales) {
  check_combine(o, pos, neg, scales);
  TORCH_CHECK(static_cast<int>(pos.size()) <= kMaxTerms, "combine (cuda): at most ", kMaxTerms, " terms");
  const c10::cuda::CUDAGuard guard(o.device());
  const at::Tensor oc = o.contiguous();
  std::vector<at::Tensor> keep;
  auto out = at::empty_like(oc);
  const int64_t M = pos[0].numel();
  if (M == 0) return out;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.scalar_type(), "sagfast_combine_cuda", [&] {
    Terms<scalar_t> terms{};
    terms.n = static_cast<int>(pos.size());
    for (size_t t = 0; t < pos.size(); ++t) {
      keep.push_back(pos[t].contiguous());
      keep.push_back(neg[t].contiguous());
      terms.pos[t] = keep[keep.size() - 2].data_ptr<scalar_t>();
      terms.neg[t] = keep.back().data_ptr<scalar_t>();
      terms.scale[t] = static_cast<float>(scales[t]);
    }
    combine_kernel<scalar_t><<<blocks_for(M, 256), 256, 0, stream>>>(oc.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                                                     terms, M, oc.numel() / M);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  return out;
}

}  // namespace sagfast

TORCH_LIBRARY_IMPL(sagfast, CUDA, m) {
  m.impl("attention_mass", &sagfast::attention_mass_cuda);
  m.impl("degrade", &sagfast::degrade_cuda);
  m.impl("combine", &sagfast::combine_cuda);
}
