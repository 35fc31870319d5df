// Paged decode attention on a CPU: one query per sequence against its keys and values read in place from the
// paged KV pool through its block table (no gather, no mask tensor).
//
//   q       (B, Hkv, G, D)      the decodes' queries, the G query heads that share KV head h as its rows
//   k, v    (NB, BS, Hkv, D)    one layer's pool of NB blocks of BS tokens
//   tables  (B, nb) int64       each sequence's blocks in order (padding entries are never read)
//   lens    (B,) int64          keys per sequence, its own new token included
//   window  keys older than lens - window are not seen (-1: none)
//   -> out  (B, Hkv, G, D)
//
// Work is split over sequences (or, with few of them, over (sequence, KV head) pairs); each task reads its keys once
// for all the query heads it serves, keeps the scores
// in float32 (two passes: scores and their max, then exp and the weighted sum of values) and writes its rows in the
// query's dtype. The loops over D vectorize (the file is built for the machine it runs on).
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty_like.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

namespace {

// exp(x) for x <= 0 (a score less its row's max): 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2 (Cephes' expf
// polynomial). Branch-free, so that the softmax loop vectorizes, which std::exp's library call does not: half the
// kernel's time at 16 bf16 decodes of 250 keys here (233 -> 120 us a layer; float32 210 -> 171 us). Relative error
// ~2e-7; below -87 it gives ~1e-38 instead of underflowing to 0 (nothing beside the max's term of 1).
inline float exp_nonpositive(float x) {
  x = std::max(x, -87.0f);
  const float n = std::nearbyint(x * 1.44269504088896341f);
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

template <typename T>
void decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& tables,
            const at::Tensor& lens, double scale, int64_t window, at::Tensor& out) {
  const int64_t B = q.size(0), Hkv = q.size(1), G = q.size(2), D = q.size(3);
  const int64_t BS = k.size(1), nb = tables.size(1);
  const T* qd = q.const_data_ptr<T>();
  const T* kd = k.const_data_ptr<T>();
  const T* vd = v.const_data_ptr<T>();
  const int64_t* td = tables.const_data_ptr<int64_t>();
  const int64_t* ld = lens.const_data_ptr<int64_t>();
  T* od = out.mutable_data_ptr<T>();
  const int64_t token_stride = Hkv * D, block_stride = BS * Hkv * D;
  int64_t longest = 0;
  for (int64_t b = 0; b < B; ++b) {
    TORCH_CHECK(ld[b] >= 1 && ld[b] <= nb * BS, "paged_decode: sequence ", b, " has ", ld[b], " keys for ", nb,
                " blocks of ", BS);
    longest = std::max(longest, ld[b]);
  }
  const float s = static_cast<float>(scale);
  // Many sequences: one task per sequence, every KV head at once, so that each token's keys (all heads, one
  // contiguous row of the block) are read in one sweep. Few: one task per (sequence, KV head), to use every thread.
  const bool by_sequence = B >= 2 * at::get_num_threads();
  const int64_t heads_per_task = by_sequence ? Hkv : 1;
  at::parallel_for(0, by_sequence ? B : B * Hkv, 1, [&](int64_t begin, int64_t end) {
    const int64_t rows = heads_per_task * G;  // query rows of one task
    std::vector<float> scores(rows * longest), acc(rows * D), qf(rows * D), top(rows), sum(rows);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = by_sequence ? i : i / Hkv, h0 = by_sequence ? 0 : i % Hkv, len = ld[b];
      const int64_t first = window < 0 ? 0 : std::max<int64_t>(0, len - window);
      const int64_t n = len - first;
      const int64_t* table = td + b * nb;
      const T* qrow = qd + (b * Hkv + h0) * G * D;  // the task's rows are consecutive in q
      for (int64_t j = 0; j < rows * D; ++j) qf[j] = static_cast<float>(qrow[j]) * s;
      std::fill(top.begin(), top.end(), -std::numeric_limits<float>::infinity());
      for (int64_t t = 0; t < n; ++t) {
        const int64_t p = first + t;
        const T* keys = kd + table[p / BS] * block_stride + (p % BS) * token_stride + h0 * D;
        for (int64_t r = 0; r < rows; ++r) {
          const T* key = keys + (r / G) * D;
          const float* qq = qf.data() + r * D;
          float dot = 0.f;
          for (int64_t d = 0; d < D; ++d) dot += qq[d] * static_cast<float>(key[d]);
          scores[r * n + t] = dot;
          top[r] = std::max(top[r], dot);
        }
      }
      for (int64_t r = 0; r < rows; ++r) {
        float total = 0.f;
        float* row = scores.data() + r * n;
        for (int64_t t = 0; t < n; ++t) {
          row[t] = exp_nonpositive(row[t] - top[r]);
          total += row[t];
        }
        sum[r] = total;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < n; ++t) {
        const int64_t p = first + t;
        const T* values = vd + table[p / BS] * block_stride + (p % BS) * token_stride + h0 * D;
        for (int64_t r = 0; r < rows; ++r) {
          const T* value = values + (r / G) * D;
          const float w = scores[r * n + t];
          float* a = acc.data() + r * D;
          for (int64_t d = 0; d < D; ++d) a[d] += w * static_cast<float>(value[d]);
        }
      }
      T* orow = od + (b * Hkv + h0) * G * D;
      for (int64_t r = 0; r < rows; ++r) {
        const float inv = 1.f / sum[r];
        for (int64_t d = 0; d < D; ++d) orow[r * D + d] = static_cast<T>(acc[r * D + d] * inv);
      }
    }
  });
}

at::Tensor paged_decode(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& tables,
                        const at::Tensor& lens, double scale, int64_t window) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, "paged_decode: q, k and v must be 4-D");
  TORCH_CHECK(q.is_contiguous() && k.is_contiguous() && v.is_contiguous() && tables.is_contiguous() &&
                  lens.is_contiguous(), "paged_decode: inputs must be contiguous");
  TORCH_CHECK(k.sizes() == v.sizes() && k.size(2) == q.size(1) && k.size(3) == q.size(3),
              "paged_decode: q ", q.sizes(), " does not match the pool ", k.sizes());
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(),
              "paged_decode: q, k and v must share a dtype");
  TORCH_CHECK(tables.scalar_type() == at::kLong && lens.scalar_type() == at::kLong && tables.dim() == 2 &&
                  tables.size(0) == q.size(0) && lens.numel() == q.size(0),
              "paged_decode: tables (B, nb) and lens (B,) must be int64 for B sequences");
  at::Tensor out = at::empty_like(q);
  switch (q.scalar_type()) {
    case at::kFloat: decode<float>(q, k, v, tables, lens, scale, window, out); break;
    case at::kBFloat16: decode<c10::BFloat16>(q, k, v, tables, lens, scale, window, out); break;
    case at::kHalf: decode<c10::Half>(q, k, v, tables, lens, scale, window, out); break;
    default: TORCH_CHECK(false, "paged_decode: unsupported dtype ", q.scalar_type());
  }
  return out;
}

}  // namespace

TORCH_LIBRARY(vlmserve_kernels, m) {
  m.def("paged_decode(Tensor q, Tensor k, Tensor v, Tensor tables, Tensor lens, float scale, int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(vlmserve_kernels, CPU, m) { m.impl("paged_decode", &paged_decode); }
