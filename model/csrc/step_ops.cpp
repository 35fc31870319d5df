// The ops a compiled CPU decode step calls, in C++, so that no Python runs between its kernels.
//
// torch.compile (with inductor's C++ wrapper) turns a decode step into C++ calls of its kernels, except where the
// graph calls an op implemented in Python: each such call takes the GIL and goes through several Python frames
// (~10 us, and a wait whenever the event loop's thread holds the GIL). A decode step of a 12-layer model made 61 such
// calls (four matmuls and one attention per layer, plus the head). Here they are C++ ops:
//
//   packed_linear(x, handle, out_features, bias)  x (..., in) times a oneDNN-packed weight registered under `handle`
//                                                 (register_packed / release_packed), through oneDNN's own op
//   decode_attention(q, k, v, layer, scale, window)
//                                                 one layer's attention of a decode-only step: writes k/v (1, N, Hkv,
//                                                 D) into the layer's pool at the step's slots, then the paged decode
//                                                 kernel (paged_decode.cpp) over the step's block tables and lengths
//   set_decode_step(pools, slots, tables, lens) / clear_decode_step()
//                                                 what decode_attention reads: the step's metadata, per thread (the
//                                                 engine thread sets it around the compiled call, as
//                                                 model/step_attention.py's `stepping` does for the Python op)
//   register_pools(pools, k, v) / release_pools(pools)
//                                                 a KV cache's per-layer pools (NB, BS, Hkv, D), registered once
#include <ATen/ATen.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <torch/library.h>

#include <mutex>
#include <optional>
#include <string_view>
#include <unordered_map>
#include <vector>

namespace {

std::mutex registry_mutex;
std::unordered_map<int64_t, at::Tensor> packed_weights;  // handle -> oneDNN-packed (MKLDNN) weight
std::unordered_map<int64_t, std::pair<std::vector<at::Tensor>, std::vector<at::Tensor>>> kv_pools;  // id -> (k, v)

struct DecodeStep {
  const std::vector<at::Tensor>* k = nullptr;  // per layer (NB, BS, Hkv, D)
  const std::vector<at::Tensor>* v = nullptr;
  at::Tensor slots, tables, lens;  // (N,), (N, nb), (N,) int64
};
thread_local DecodeStep step;

void register_packed(int64_t handle, const at::Tensor& weight) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  packed_weights[handle] = weight;
}

void release_packed(int64_t handle) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  packed_weights.erase(handle);
}

at::Tensor packed_linear(const at::Tensor& x, int64_t handle, int64_t out_features,
                         const std::optional<at::Tensor>& bias) {
  static auto op = c10::Dispatcher::singleton()
                       .findSchemaOrThrow("mkldnn::_linear_pointwise", "")
                       .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const std::optional<at::Tensor>&,
                                         c10::string_view, c10::List<std::optional<at::Scalar>>,
                                         std::optional<c10::string_view>)>();
  at::Tensor weight;
  {
    std::lock_guard<std::mutex> lock(registry_mutex);
    auto it = packed_weights.find(handle);
    TORCH_CHECK(it != packed_weights.end(), "packed_linear: no weight is registered under handle ", handle);
    weight = it->second;
  }
  at::Tensor out = op.call(x, weight, bias, "none", c10::List<std::optional<at::Scalar>>(), "");
  TORCH_CHECK(out.size(-1) == out_features, "packed_linear: the weight gives ", out.size(-1), " features, not ",
              out_features);
  return out;
}

void register_pools(int64_t id, std::vector<at::Tensor> k, std::vector<at::Tensor> v) {
  TORCH_CHECK(k.size() == v.size(), "register_pools: ", k.size(), " key pools but ", v.size(), " value pools");
  std::lock_guard<std::mutex> lock(registry_mutex);
  kv_pools[id] = {std::move(k), std::move(v)};
}

void release_pools(int64_t id) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  kv_pools.erase(id);
}

void set_decode_step(int64_t pools, const at::Tensor& slots, const at::Tensor& tables, const at::Tensor& lens) {
  std::lock_guard<std::mutex> lock(registry_mutex);
  auto it = kv_pools.find(pools);
  TORCH_CHECK(it != kv_pools.end(), "set_decode_step: no KV pools are registered under ", pools);
  step.k = &it->second.first;  // stable: the map's node lives until release_pools, which no step outlives
  step.v = &it->second.second;
  step.slots = slots;
  step.tables = tables;
  step.lens = lens;
}

void clear_decode_step() { step = DecodeStep(); }

at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, int64_t layer,
                            double scale, int64_t window) {
  static auto paged_decode =
      c10::Dispatcher::singleton()
          .findSchemaOrThrow("vlmserve_kernels::paged_decode", "")
          .typed<at::Tensor(const at::Tensor&, const at::Tensor&, const at::Tensor&, const at::Tensor&,
                            const at::Tensor&, double, int64_t)>();
  TORCH_CHECK(step.k != nullptr, "decode_attention: called outside set_decode_step / clear_decode_step");
  TORCH_CHECK(layer >= 0 && layer < static_cast<int64_t>(step.k->size()), "decode_attention: layer ", layer,
              " of ", step.k->size());
  TORCH_CHECK(q.dim() == 4 && q.size(0) == 1 && k.dim() == 4 && k.sizes() == v.sizes() && k.size(1) == q.size(1),
              "decode_attention: q (1, N, H, D) and k, v (1, N, Hkv, D) expected, got ", q.sizes(), " and ",
              k.sizes());
  const at::Tensor& kp = (*step.k)[layer];  // (NB, BS, Hkv, D)
  const at::Tensor& vp = (*step.v)[layer];
  const int64_t n = q.size(1), h = q.size(2), hkv = k.size(2), d = q.size(3);
  TORCH_CHECK(step.slots.numel() == n && step.lens.numel() == n, "decode_attention: ", n,
              " queries but the step has ", step.slots.numel(), " slots and ", step.lens.numel(), " lengths");
  kp.view({-1, hkv, d}).index_copy_(0, step.slots, k[0]);  // (NB * BS, Hkv, D) at the new tokens' slots
  vp.view({-1, hkv, d}).index_copy_(0, step.slots, v[0]);
  at::Tensor qd = q[0].reshape({n, hkv, h / hkv, d}).contiguous();  // (N, Hkv, G, D)
  at::Tensor out = paged_decode.call(qd, kp, vp, step.tables, step.lens, scale, window);  // (N, Hkv, G, D)
  return out.view({1, n, h, d});
}

}  // namespace

TORCH_LIBRARY(vlmserve_step, m) {
  m.def("register_packed(int handle, Tensor weight) -> ()", &register_packed);
  m.def("release_packed(int handle) -> ()", &release_packed);
  m.def("packed_linear(Tensor x, int handle, int out_features, Tensor? bias) -> Tensor");
  m.def("register_pools(int id, Tensor[] k, Tensor[] v) -> ()", &register_pools);
  m.def("release_pools(int id) -> ()", &release_pools);
  m.def("set_decode_step(int pools, Tensor slots, Tensor tables, Tensor lens) -> ()", &set_decode_step);
  m.def("clear_decode_step() -> ()", &clear_decode_step);
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, int layer, float scale, int window) -> Tensor");
}

TORCH_LIBRARY_IMPL(vlmserve_step, CPU, m) {
  m.impl("packed_linear", &packed_linear);
  m.impl("decode_attention", &decode_attention);
}
