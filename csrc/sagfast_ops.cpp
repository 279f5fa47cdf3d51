// sagfast C++ ops: schemas (TORCH_LIBRARY(sagfast, m)) and CPU kernels.
//
// The specs are the PyTorch references in sagfast/ops/<op>.py; the fake (meta) implementations that
// torch.compile and CUDA-graph capture need are registered from Python (sagfast/ops/_cpp.py).
// CUDA kernels live in sagfast_cuda.cu, compiled only when a CUDA toolkit and a CUDA torch exist.
//
// CPU strategy: at::parallel_for over independent work (heads x key blocks, planes, element ranges),
// plain inner loops over contiguous fp32 buffers that the compiler vectorizes, fp32 math throughout.
// ATen calls made inside a parallel region (mm, exp) run single-threaded there, on ATen's runtime-
// dispatched SIMD kernels.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <Python.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "sagfast_common.h"

namespace sagfast {

// ----------------------------------------------------------------------------------------------------
// attention_mass: mass[b, j] = mean_h sum_i exp(q[b,h,i] . k[b,h,j] * scale - lse[b,h,i]).
// Shape of flash-attention's dK/dV loop: one task owns a block of keys of one (b, h) and walks over
// all query blocks; only a [kQueryBlock, kKeyBlock] tile of scores exists per thread, never N x N.
// ----------------------------------------------------------------------------------------------------

// Elements per parallel chunk for the memory-bound ops, ATen's own grain (at::internal::GRAIN_SIZE):
// below it a parallel region costs more than it saves.
constexpr int64_t kGrainElements = 32768;

constexpr int64_t kKeyBlock = 256;
constexpr int64_t kQueryBlock = 256;

// Copies rows [r0, r0 + rows) of one (b, h) slice of a [B, H, N, D] tensor with any strides into a
// contiguous fp32 [rows, D] buffer.
template <typename scalar_t>
void load_rows_fp32(const scalar_t* base, int64_t stride_n, int64_t stride_d, int64_t r0, int64_t rows, int64_t D,
                    float* dst) {
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* src = base + (r0 + r) * stride_n;
    float* d = dst + r * D;
    for (int64_t c = 0; c < D; ++c) d[c] = static_cast<float>(src[c * stride_d]);
  }
}

template <typename scalar_t>
void attention_mass_partial(const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse, float scale,
                            at::Tensor& part) {
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2), D = q.size(3);
  const int64_t key_blocks = (N + kKeyBlock - 1) / kKeyBlock;
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = k.data_ptr<scalar_t>();
  const float* lp = lse.data_ptr<float>();
  float* pp = part.data_ptr<float>();
  const auto qs = q.strides(), ks = k.strides(), ls = lse.strides();

  at::parallel_for(0, B * H * key_blocks, 1, [&](int64_t begin, int64_t end) {
    // Per-thread scratch, bounded whatever N is: a key block, a query block, one tile of scores.
    std::vector<float> kbuf(kKeyBlock * D), qbuf(kQueryBlock * D), acc(kKeyBlock);
    const auto fopt = at::TensorOptions().dtype(at::kFloat);
    auto scores = at::empty({kQueryBlock * kKeyBlock}, fopt);
    float* sp = scores.data_ptr<float>();
    for (int64_t task = begin; task < end; ++task) {
      const int64_t bh = task / key_blocks, j0 = (task % key_blocks) * kKeyBlock;
      const int64_t b = bh / H, h = bh % H;
      const int64_t jn = std::min(kKeyBlock, N - j0);
      load_rows_fp32(kp + b * ks[0] + h * ks[1], ks[2], ks[3], j0, jn, D, kbuf.data());
      const float* lrow = lp + b * ls[0] + h * ls[1];
      std::fill(acc.begin(), acc.begin() + jn, 0.0f);
      for (int64_t i0 = 0; i0 < N; i0 += kQueryBlock) {
        const int64_t in = std::min(kQueryBlock, N - i0);
        load_rows_fp32(qp + b * qs[0] + h * qs[1], qs[2], qs[3], i0, in, D, qbuf.data());
        // scores[i][j] = q_i . k_j on the fp32 buffers (ATen's BLAS; single-threaded in this region).
        at::Tensor s = scores.narrow(0, 0, in * jn).view({in, jn});
        at::mm_out(s, at::from_blob(qbuf.data(), {in, D}, fopt), at::from_blob(kbuf.data(), {jn, D}, fopt).t());
        for (int64_t r = 0; r < in; ++r) {
          const float l = lrow[(i0 + r) * ls[2]];
          float* row = sp + r * jn;
          for (int64_t c = 0; c < jn; ++c) row[c] = row[c] * scale - l;
        }
        scores.narrow(0, 0, in * jn).exp_();  // ATen's vectorized exp (runtime-dispatched SIMD)
        for (int64_t r = 0; r < in; ++r) {
          const float* row = sp + r * jn;
          for (int64_t c = 0; c < jn; ++c) acc[c] += row[c];
        }
      }
      std::copy(acc.begin(), acc.begin() + jn, pp + bh * N + j0);
    }
  });
}

std::tuple<at::Tensor, at::Tensor> attention_mass_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& lse_in, double scale, double threshold) {
  check_attention_mass(q, k, lse_in);
  const int64_t B = q.size(0), H = q.size(1), N = q.size(2);
  const at::Tensor lse = lse_in.to(at::kFloat);  // no copy for SDPA's fp32 lse
  auto part = at::empty({B, H, N}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "sagfast_attention_mass_cpu", [&] {
    attention_mass_partial<scalar_t>(q, k, lse, static_cast<float>(scale), part);
  });

  // Mean over heads in a fixed order (deterministic), and the mask in the same loop.
  auto mass = at::empty({B, N}, q.options().dtype(at::kFloat));
  auto mask = at::empty({B, N}, q.options().dtype(at::kBool));
  const float* pp = part.data_ptr<float>();
  float* mp = mass.data_ptr<float>();
  bool* kp = mask.data_ptr<bool>();
  const float thr = static_cast<float>(threshold);
  at::parallel_for(0, B, std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, H * N)), [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      float* m = mp + b * N;
      std::fill(m, m + N, 0.0f);
      for (int64_t h = 0; h < H; ++h) {
        const float* p = pp + (b * H + h) * N;
        for (int64_t j = 0; j < N; ++j) m[j] += p[j];
      }
      for (int64_t j = 0; j < N; ++j) {
        m[j] /= static_cast<float>(H);
        kp[b * N + j] = m[j] > thr;
      }
    }
  });
  return {mass, mask};
}

// ----------------------------------------------------------------------------------------------------
// degrade: xd = sqrt(abar) * where(M, blur(x0), x0) + sqrt(1 - abar) * eps, per (b, c) plane:
// a row pass into a plane-sized fp32 buffer, then per output row the column pass, the blend with the
// index-upsampled mask and the re-noise, written once.
// ----------------------------------------------------------------------------------------------------

template <typename scalar_t>
void degrade_plane_loop(const at::Tensor& x0, const at::Tensor& mask, const at::Tensor& eps,
                        const at::Tensor& abar, at::Tensor& out, const std::vector<float>& w) {
  const int64_t B = x0.size(0), C = x0.size(1), Hh = x0.size(2), W = x0.size(3);
  const int64_t mh = mask.size(1), mw = mask.size(2);
  const int64_t K = static_cast<int64_t>(w.size()), pad = K / 2;
  const scalar_t* xp = x0.data_ptr<scalar_t>();
  const scalar_t* ep = eps.data_ptr<scalar_t>();
  scalar_t* op = out.data_ptr<scalar_t>();
  const bool* mp = mask.data_ptr<bool>();
  const float* ap = abar.data_ptr<float>();
  const auto xs = x0.strides(), es = eps.strides(), ms = mask.strides(), os = out.strides();
  std::vector<int64_t> mcol(W);
  for (int64_t j = 0; j < W; ++j) mcol[j] = j * mw / W;  // floor(j * w / W), the reference's index

  // Enough planes per chunk that a chunk is worth a thread (small latents then run inline).
  const int64_t grain = std::max<int64_t>(1, kGrainElements / std::max<int64_t>(1, Hh * W));
  at::parallel_for(0, B * C, grain, [&](int64_t begin, int64_t end) {
    std::vector<float> padded(W + 2 * pad), tmp(Hh * W), acc(W);
    for (int64_t plane = begin; plane < end; ++plane) {
      const int64_t b = plane / C, c = plane % C;
      const scalar_t* x = xp + b * xs[0] + c * xs[1];
      const scalar_t* e = ep + b * es[0] + c * es[1];
      scalar_t* o = op + b * os[0] + c * os[1];
      const float sa = std::sqrt(ap[b]), sb = std::sqrt(1.0f - ap[b]);
      for (int64_t i = 0; i < Hh; ++i) {
        for (int64_t j = -pad; j < W + pad; ++j)
          padded[j + pad] = static_cast<float>(x[i * xs[2] + reflect(j, W) * xs[3]]);
        float* t = tmp.data() + i * W;
        std::fill(t, t + W, 0.0f);
        for (int64_t dx = 0; dx < K; ++dx) {
          const float wx = w[dx];
          const float* src = padded.data() + dx;
          for (int64_t j = 0; j < W; ++j) t[j] += wx * src[j];
        }
      }
      for (int64_t i = 0; i < Hh; ++i) {
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t dy = 0; dy < K; ++dy) {
          const float wy = w[dy];
          const float* src = tmp.data() + reflect(i + dy - pad, Hh) * W;
          for (int64_t j = 0; j < W; ++j) acc[j] += wy * src[j];
        }
        const bool* mrow = mp + b * ms[0] + (i * mh / Hh) * ms[1];
        for (int64_t j = 0; j < W; ++j) {
          const float xv = static_cast<float>(x[i * xs[2] + j * xs[3]]);
          const float x0d = mrow[mcol[j] * ms[2]] ? acc[j] : xv;
          const float ev = static_cast<float>(e[i * es[2] + j * es[3]]);
          o[i * os[2] + j * os[3]] = static_cast<scalar_t>(sa * x0d + sb * ev);
        }
      }
    }
  });
}

at::Tensor degrade_cpu(const at::Tensor& x0, const at::Tensor& mask, const at::Tensor& eps,
                       const at::Tensor& abar, int64_t kernel_size, double sigma) {
  check_degrade(x0, mask, eps, abar, kernel_size, sigma);
  const at::Tensor m = mask.scalar_type() == at::kBool ? mask : mask.ne(0);
  const at::Tensor a = abar.to(at::kFloat).contiguous();
  auto out = at::empty_like(x0, at::MemoryFormat::Contiguous);
  const std::vector<float> w = gaussian_weights(kernel_size, sigma);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x0.scalar_type(), "sagfast_degrade_cpu", [&] {
    degrade_plane_loop<scalar_t>(x0, m, eps, a, out, w);
  });
  return out;
}

// ----------------------------------------------------------------------------------------------------
// combine: out[k] = o[k] + sum_t scales[t, row] * (pos[t] - neg[t]) for every chunk k of o, any number
// of terms, each term's scale per row of the [B, ...] term slice (fp32 [T, B]). The terms are summed
// once per element range (fp32) and reused across the chunks.
// ----------------------------------------------------------------------------------------------------

template <typename scalar_t>
void combine_loop(const at::Tensor& o, const std::vector<at::Tensor>& pos, const std::vector<at::Tensor>& neg,
                  const at::Tensor& scales, at::Tensor& out) {
  const int64_t M = pos[0].numel(), chunks = o.numel() / M, B = pos[0].size(0), per_row = M / B;
  const scalar_t* op = o.data_ptr<scalar_t>();
  scalar_t* dp = out.data_ptr<scalar_t>();
  const float* sp = scales.data_ptr<float>();
  constexpr int64_t kGrain = 4096;  // inner block: the term buffer stays in L1
  at::parallel_for(0, M, kGrainElements, [&](int64_t begin, int64_t end) {
    std::vector<float> term(kGrain);
    for (int64_t i0 = begin; i0 < end; i0 += kGrain) {
      const int64_t n = std::min(kGrain, end - i0);
      std::fill(term.begin(), term.begin() + n, 0.0f);
      for (size_t t = 0; t < pos.size(); ++t) {
        const scalar_t* p = pos[t].data_ptr<scalar_t>() + i0;
        const scalar_t* q = neg[t].data_ptr<scalar_t>() + i0;
        const float* st = sp + static_cast<int64_t>(t) * B;
        for (int64_t i = 0; i < n; ++i)
          term[i] += st[(i0 + i) / per_row] * (static_cast<float>(p[i]) - static_cast<float>(q[i]));
      }
      for (int64_t k = 0; k < chunks; ++k) {
        const scalar_t* src = op + k * M + i0;
        scalar_t* dst = dp + k * M + i0;
        for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<scalar_t>(static_cast<float>(src[i]) + term[i]);
      }
    }
  });
}

at::Tensor combine_cpu(const at::Tensor& o, at::TensorList pos, at::TensorList neg, const at::Tensor& scales_in) {
  check_combine(o, pos, neg, scales_in);
  const at::Tensor oc = o.contiguous();
  std::vector<at::Tensor> pc, nc;
  for (size_t t = 0; t < pos.size(); ++t) {
    pc.push_back(pos[t].contiguous());
    nc.push_back(neg[t].contiguous());
  }
  auto out = at::empty_like(oc);
  const at::Tensor scales = scales_in.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, o.scalar_type(), "sagfast_combine_cpu", [&] {
    combine_loop<scalar_t>(oc, pc, nc, scales, out);
  });
  return out;
}

}  // namespace sagfast

TORCH_LIBRARY(sagfast, m) {
  m.def("attention_mass(Tensor q, Tensor k, Tensor lse, float scale, float threshold) -> (Tensor, Tensor)");
  m.def("degrade(Tensor x0, Tensor mask, Tensor eps, Tensor abar, int kernel_size, float sigma) -> Tensor");
  m.def("combine(Tensor o, Tensor[] pos, Tensor[] neg, Tensor scales) -> Tensor");
}

TORCH_LIBRARY_IMPL(sagfast, CPU, m) {
  m.impl("attention_mass", &sagfast::attention_mass_cpu);
  m.impl("degrade", &sagfast::degrade_cpu);
  m.impl("combine", &sagfast::combine_cpu);
}

// `import sagfast._C` loads this library, which runs the registrations above. The module itself is empty.
extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
