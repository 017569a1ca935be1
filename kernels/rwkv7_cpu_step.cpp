// The fused one-token decode step of RWKV-7 on the CPU: all layers and the head in
// one call, `torch.ops.rwkv_nvim_cpu.decode_step`, instead of ~50 torch ops per layer.
// Same math as RWKV7._time_mix / _channel_mix in rwkv_engine/core/model.py (the reference
// it is tested against), for B rows of one token each:
//
//   decode_step(x [B, C] f32 (embeddings, ln0 folded in), params (LAYER_PARAMS per layer,
//               then ln_out.w, ln_out.b, head A, head B), state_in, state_out, n_head,
//               q4_a8 = false)
//     -> logits [B, V] f32
//
// state_in / state_out: per layer (att_x [B, C], wkv [B, H, 64, 64], ffn_x [B, C]), all
// f32 contiguous; state_in is only read, state_out (allocated by the caller) written.
// A linear is a pair (A, B): A int8 = packed q8 weights with B its scales (see
// rwkv7_cpu_linear.h), A uint8 = packed q4 weights with B its scales (rwkv7_cpu_q4.h),
// A f32 = W [O, I] (B unused). LoRA matrices come as [out, in]. q4_a8: the q4 products
// take 8-bit activations (rwkv7_cpu_q4a8.h; the "q4a8" mode), the q8 ones stay int16.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "rwkv7_cpu_linear.h"
#include "rwkv7_cpu_math.h"
#include "wkv7_cpu_head.h"

namespace {

using rwkv_cpu::kHeadSize;

// Order of one layer's tensors in `params` (rwkv_engine/core/fused_step.py builds it).
enum Param : int64_t {
  LN1_W, LN1_B, LN2_W, LN2_B,                  // [C]
  X_R, X_W, X_K, X_V, X_A, X_G,                // token-shift mixes [C]
  W0, A0, V0, K_K, K_A,                        // [C] (V0 empty on layer 0)
  R_K,                                         // [H, 64]
  LNX_W, LNX_B, FFN_X_K,                       // [C]
  LIN_R, LIN_K = LIN_R + 2, LIN_V = LIN_K + 2, LIN_O = LIN_V + 2,   // [C, C]
  LIN_W1 = LIN_O + 2, LIN_W2 = LIN_W1 + 2,     // decay LoRA [D, C], [C, D]
  LIN_A1 = LIN_W2 + 2, LIN_A2 = LIN_A1 + 2,    // in-context rate LoRA
  LIN_V1 = LIN_A2 + 2, LIN_V2 = LIN_V1 + 2,    // value-mix LoRA (empty on layer 0)
  LIN_G1 = LIN_V2 + 2, LIN_G2 = LIN_G1 + 2,    // gate LoRA
  LIN_FK = LIN_G2 + 2, LIN_FV = LIN_FK + 2,    // ffn key [F, C], value [C, F]
  LAYER_PARAMS = LIN_FV + 2,
};

struct Linear {
  const int8_t* wq = nullptr;  // q8: packed weights
  const uint8_t* w4 = nullptr;  // q4: packed weights (scales in ws)
  bool a8 = false;             // q4: with 8-bit activations (q4a8_linear)
  const uint16_t* ws = nullptr;  // q8: scales (fp16 bits)
  const float* w = nullptr;    // f32: W [O, I]
  int64_t O = 0, I = 0;

  void apply(const float* x, int64_t M, float* y, bool accumulate) const {
    if (wq != nullptr)
      rwkv_cpu::q8_linear(x, M, I, wq, ws, O, y, accumulate);
    else if (w4 != nullptr && a8)
      rwkv_cpu::q4a8_linear(x, M, I, w4, ws, O, y, accumulate);
    else if (w4 != nullptr)
      rwkv_cpu::q4_linear(x, M, I, w4, ws, O, y, accumulate);
    else
      rwkv_cpu::f32_linear(x, M, I, w, O, y, accumulate);
  }
};

// q4_a8: the call's q4 products take 8-bit activations ("q4a8" mode).
Linear linear(bool q4_a8, const at::Tensor& a, const at::Tensor& b, int64_t in, const char* what,
              int64_t max_out = -1) {
  Linear l;
  TORCH_CHECK(a.is_contiguous() && a.device().is_cpu(), "decode_step: ", what, " must be contiguous on the CPU");
  if (a.scalar_type() == at::kChar) {
    TORCH_CHECK(a.dim() == 3 && b.dim() == 3 && b.scalar_type() == at::kHalf && b.is_contiguous(),
                "decode_step: ", what, " q8 weights must be [O/16, I/32, 512] int8 + [O/16, I/32, 16] f16");
    l.wq = a.data_ptr<int8_t>();
    l.ws = reinterpret_cast<const uint16_t*>(b.data_ptr<at::Half>());
    l.O = a.size(0) * rwkv_cpu::kTile;
    l.I = a.size(1) * rwkv_cpu::kBlock;
  } else if (a.scalar_type() == at::kByte) {
    TORCH_CHECK(a.dim() == 3 && a.size(2) == rwkv_cpu::kTileBlockBytes / 2 && b.dim() == 3 &&
                    b.scalar_type() == at::kHalf && b.is_contiguous() && b.size(0) == a.size(0) &&
                    b.size(1) == a.size(1),
                "decode_step: ", what, " q4 weights must be [O/16, I/32, 256] uint8 + [O/16, I/32, 16] f16");
    l.w4 = a.data_ptr<uint8_t>();
    l.a8 = q4_a8;
    l.ws = reinterpret_cast<const uint16_t*>(b.data_ptr<at::Half>());
    l.O = a.size(0) * rwkv_cpu::kTile;
    l.I = a.size(1) * rwkv_cpu::kBlock;
  } else {
    TORCH_CHECK(a.dim() == 2 && a.scalar_type() == at::kFloat, "decode_step: ", what,
                " must be f32 [O, I] or q8, got ", a.scalar_type(), " ", a.sizes());
    l.w = a.data_ptr<float>();
    l.O = a.size(0);
    l.I = a.size(1);
  }
  TORCH_CHECK(in < 0 || l.I == in, "decode_step: ", what, " takes ", l.I, " inputs, expected ", in);
  TORCH_CHECK(max_out < 0 || l.O <= max_out, "decode_step: ", what, " has ", l.O, " outputs, at most ", max_out);
  return l;
}

const float* vec(const at::Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.scalar_type() == at::kFloat && t.is_contiguous() && t.numel() == n,
              "decode_step: ", what, " must be ", n, " contiguous float32 values, got ", t.sizes());
  return t.data_ptr<float>();
}

void layer_norm(const float* x, int64_t B, int64_t C, const float* w, const float* b, float eps,
                float* out) {
  for (int64_t r = 0; r < B; ++r) {
    const float* xr = x + r * C;
    float mean = 0.f, var = 0.f;
#pragma omp simd reduction(+ : mean)
    for (int64_t c = 0; c < C; ++c) mean += xr[c];
    mean /= static_cast<float>(C);
#pragma omp simd reduction(+ : var)
    for (int64_t c = 0; c < C; ++c) var += (xr[c] - mean) * (xr[c] - mean);
    const float inv = 1.f / std::sqrt(var / static_cast<float>(C) + eps);
    float* o = out + r * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) o[c] = (xr[c] - mean) * inv * w[c] + b[c];
  }
}

// fn(r) for the B rows; several rows are split across the threads (one row stays on
// this thread: a fork costs more than its transcendentals).
template <class Fn>
void for_each_row(int64_t B, const Fn& fn) {
  at::parallel_for(0, B, B >= 4 ? 2 : B + 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) fn(r);
  });
}

// the transcendental loops (rwkv7_cpu_math.h: NEON on aarch64, vectorized scalar loops elsewhere)
using rwkv_cpu::decay_array;
using rwkv_cpu::sigmoid_array;
using rwkv_cpu::sigmoid_bias_array;
using rwkv_cpu::tanh_array;
using rwkv_cpu::value_mix_array;

struct Buffers {  // per call: B rows of each activation, and whether q4 products take 8-bit ones
  bool q4_a8 = false;
  std::vector<float> h, xr, xw, xk, xv, xa, xg, r, k, v, w, a, g, kk, nb, y, v_first, t1, t2, hid;
  void resize(int64_t B, int64_t C, int64_t F) {  // LoRA widths (t1) are below C
    for (auto* buf : {&h, &xr, &xw, &xk, &xv, &xa, &xg, &r, &k, &v, &w, &a, &g, &kk, &nb, &y, &v_first, &t1, &t2})
      buf->resize(B * C);
    hid.resize(B * F);
  }
};

struct LayerState {
  const float *att_in, *wkv_in, *ffn_in;
  float *att_out, *wkv_out, *ffn_out;
};

void time_mix(const std::vector<at::Tensor>& p, int64_t layer, const LayerState& s, float* x,
              int64_t B, int64_t C, int64_t H, Buffers& bf) {
  const at::Tensor* q = p.data() + layer * LAYER_PARAMS;
  const int64_t n = B * C;
  const bool has_v_mix = q[V0].numel() > 0;
  layer_norm(x, B, C, vec(q[LN1_W], C, "ln1.weight"), vec(q[LN1_B], C, "ln1.bias"), 1e-5f, bf.h.data());
  {
    const float *mr = vec(q[X_R], C, "x_r"), *mw = vec(q[X_W], C, "x_w"), *mk = vec(q[X_K], C, "x_k"),
                *mv = vec(q[X_V], C, "x_v"), *ma = vec(q[X_A], C, "x_a"), *mg = vec(q[X_G], C, "x_g");
    const float* h = bf.h.data();
    for (int64_t i = 0; i < n; ++i) {
      const int64_t c = i % C;
      const float d = s.att_in[i] - h[i];
      s.att_out[i] = h[i];
      bf.xr[i] = h[i] + d * mr[c];
      bf.xw[i] = h[i] + d * mw[c];
      bf.xk[i] = h[i] + d * mk[c];
      bf.xv[i] = h[i] + d * mv[c];
      bf.xa[i] = h[i] + d * ma[c];
      bf.xg[i] = h[i] + d * mg[c];
    }
  }
  linear(bf.q4_a8, q[LIN_R], q[LIN_R + 1], C, "receptance").apply(bf.xr.data(), B, bf.r.data(), false);
  linear(bf.q4_a8, q[LIN_K], q[LIN_K + 1], C, "key").apply(bf.xk.data(), B, bf.k.data(), false);
  linear(bf.q4_a8, q[LIN_V], q[LIN_V + 1], C, "value").apply(bf.xv.data(), B, bf.v.data(), false);
  // decay: w = -softplus(-(w0 + tanh(xw W1^T) W2^T)) - 0.5
  const Linear w1 = linear(bf.q4_a8, q[LIN_W1], q[LIN_W1 + 1], C, "w1", C);  // LoRA down: width <= C
  w1.apply(bf.xw.data(), B, bf.t1.data(), false);
  tanh_array(bf.t1.data(), B * w1.O);
  linear(bf.q4_a8, q[LIN_W2], q[LIN_W2 + 1], w1.O, "w2").apply(bf.t1.data(), B, bf.w.data(), false);
  const float* w0 = vec(q[W0], C, "w0");
  for_each_row(B, [&](int64_t r) { decay_array(bf.w.data() + r * C, w0, C); });
  // in-context learning rate: a = sigmoid(a0 + (xa A1^T) A2^T)
  const Linear a1 = linear(bf.q4_a8, q[LIN_A1], q[LIN_A1 + 1], C, "a1", C);  // LoRA down: width <= C
  a1.apply(bf.xa.data(), B, bf.t1.data(), false);
  linear(bf.q4_a8, q[LIN_A2], q[LIN_A2 + 1], a1.O, "a2").apply(bf.t1.data(), B, bf.a.data(), false);
  const float* a0 = vec(q[A0], C, "a0");
  for_each_row(B, [&](int64_t r) { sigmoid_bias_array(bf.a.data() + r * C, a0, C); });
  // output gate: g = sigmoid(xg G1^T) G2^T
  const Linear g1 = linear(bf.q4_a8, q[LIN_G1], q[LIN_G1 + 1], C, "g1", C);  // LoRA down: width <= C
  g1.apply(bf.xg.data(), B, bf.t1.data(), false);
  sigmoid_array(bf.t1.data(), B * g1.O);
  linear(bf.q4_a8, q[LIN_G2], q[LIN_G2 + 1], g1.O, "g2").apply(bf.t1.data(), B, bf.g.data(), false);
  // kk = normalize(k * k_k) per head; k = k * (1 + (a - 1) * k_a)
  {
    const float *k_k = vec(q[K_K], C, "k_k"), *k_a = vec(q[K_A], C, "k_a");
    for (int64_t rh = 0; rh < B * H; ++rh) {
      const int64_t base = rh * kHeadSize, cb = (rh % H) * kHeadSize;
      float ss = 0.f;
      for (int64_t j = 0; j < kHeadSize; ++j) {
        const float t = bf.k[base + j] * k_k[cb + j];
        bf.kk[base + j] = t;
        ss += t * t;
      }
      const float inv = 1.f / std::max(std::sqrt(ss), 1e-12f);  // F.normalize's eps
      for (int64_t j = 0; j < kHeadSize; ++j) {
        const int64_t i = base + j;
        bf.kk[i] *= inv;
        bf.nb[i] = bf.kk[i] * bf.a[i];                             // b = kk * a
        bf.kk[i] = -bf.kk[i];                                     // a_wkv = -kk
        bf.k[i] = bf.k[i] * (1.f + (bf.a[i] - 1.f) * k_a[cb + j]);
      }
    }
  }
  // value residual: v += (v_first - v) * sigmoid(v0 + (xv V1^T) V2^T), or remember v
  if (has_v_mix) {
    const Linear v1 = linear(bf.q4_a8, q[LIN_V1], q[LIN_V1 + 1], C, "v1", C);  // LoRA down: width <= C
    v1.apply(bf.xv.data(), B, bf.t1.data(), false);
    linear(bf.q4_a8, q[LIN_V2], q[LIN_V2 + 1], v1.O, "v2").apply(bf.t1.data(), B, bf.t2.data(), false);
    const float* v0 = vec(q[V0], C, "v0");
    for_each_row(B, [&](int64_t r) {
      value_mix_array(bf.v.data() + r * C, bf.v_first.data() + r * C, bf.t2.data() + r * C, v0, C);
    });
  } else {
    std::copy(bf.v.begin(), bf.v.begin() + n, bf.v_first.begin());
  }
  // WKV: one step per (row, head), state_in -> state_out
  at::parallel_for(0, B * H, 4, [&](int64_t begin, int64_t end) {
    for (int64_t rh = begin; rh < end; ++rh) {
      const int64_t o = rh * kHeadSize, so = rh * kHeadSize * kHeadSize;
      rwkv_cpu::wkv7_head_rows(1, H * kHeadSize, s.wkv_in + so, s.wkv_out + so, bf.r.data() + o,
                               bf.w.data() + o, bf.k.data() + o, bf.v.data() + o, bf.kk.data() + o,
                               bf.nb.data() + o, bf.y.data() + o);
    }
  });
  // y = group_norm(y) per head + (sum(r * k * r_k) per head) * v, gated
  {
    const float *lw = vec(q[LNX_W], C, "ln_x.weight"), *lb = vec(q[LNX_B], C, "ln_x.bias"),
                *r_k = vec(q[R_K], C, "r_k");
    for (int64_t rh = 0; rh < B * H; ++rh) {
      const int64_t base = rh * kHeadSize, cb = (rh % H) * kHeadSize;
      const float* yh = bf.y.data() + base;
      float mean = 0.f, var = 0.f, bonus = 0.f;
      for (int64_t j = 0; j < kHeadSize; ++j) mean += yh[j];
      mean /= kHeadSize;
      for (int64_t j = 0; j < kHeadSize; ++j) var += (yh[j] - mean) * (yh[j] - mean);
      const float inv = 1.f / std::sqrt(var / kHeadSize + 64e-5f);
      for (int64_t j = 0; j < kHeadSize; ++j) bonus += bf.r[base + j] * bf.k[base + j] * r_k[cb + j];
      for (int64_t j = 0; j < kHeadSize; ++j) {
        const int64_t i = base + j;
        const float yn = (bf.y[i] - mean) * inv * lw[cb + j] + lb[cb + j];
        bf.y[i] = (yn + bonus * bf.v[i]) * bf.g[i];
      }
    }
  }
  linear(bf.q4_a8, q[LIN_O], q[LIN_O + 1], C, "output").apply(bf.y.data(), B, x, true);
}

void channel_mix(const std::vector<at::Tensor>& p, int64_t layer, const LayerState& s, float* x,
                 int64_t B, int64_t C, Buffers& bf) {
  const at::Tensor* q = p.data() + layer * LAYER_PARAMS;
  const int64_t n = B * C;
  layer_norm(x, B, C, vec(q[LN2_W], C, "ln2.weight"), vec(q[LN2_B], C, "ln2.bias"), 1e-5f, bf.h.data());
  const float* mk = vec(q[FFN_X_K], C, "ffn.x_k");
  for (int64_t i = 0; i < n; ++i) {
    const float f = bf.h[i];
    s.ffn_out[i] = f;
    bf.xk[i] = f + (s.ffn_in[i] - f) * mk[i % C];
  }
  const Linear fk = linear(bf.q4_a8, q[LIN_FK], q[LIN_FK + 1], C, "ffn.key");
  fk.apply(bf.xk.data(), B, bf.hid.data(), false);
  for (int64_t i = 0; i < B * fk.O; ++i) {
    const float t = std::max(bf.hid[i], 0.f);
    bf.hid[i] = t * t;  // relu(.)^2
  }
  linear(bf.q4_a8, q[LIN_FV], q[LIN_FV + 1], fk.O, "ffn.value").apply(bf.hid.data(), B, x, true);
}

at::Tensor decode_step(const at::Tensor& x_in, at::TensorList params_in, at::TensorList state_in,
                       at::TensorList state_out, int64_t n_head, bool q4_a8) {
  TORCH_CHECK(x_in.dim() == 2 && x_in.scalar_type() == at::kFloat && x_in.device().is_cpu(),
              "decode_step: x must be [B, C] float32 on the CPU, got ", x_in.sizes());
  const int64_t B = x_in.size(0), C = x_in.size(1), H = n_head;
  TORCH_CHECK(H * kHeadSize == C, "decode_step: n_head * 64 must equal C = ", C);
  const int64_t P = static_cast<int64_t>(params_in.size());
  TORCH_CHECK(P >= 4 && (P - 4) % LAYER_PARAMS == 0, "decode_step: expected ", LAYER_PARAMS,
              " tensors per layer + 4, got ", P);
  const int64_t L = (P - 4) / LAYER_PARAMS;
  TORCH_CHECK(static_cast<int64_t>(state_in.size()) == 3 * L && static_cast<int64_t>(state_out.size()) == 3 * L,
              "decode_step: expected 3 state tensors per layer (", 3 * L, ")");
  const std::vector<at::Tensor> p(params_in.begin(), params_in.end());
  const int64_t F = p[LIN_FK].size(0) * (p[LIN_FK].dim() == 3 ? rwkv_cpu::kTile : 1);
  thread_local Buffers bf;
  bf.resize(B, C, F);
  bf.q4_a8 = q4_a8;
  at::Tensor x = x_in.contiguous().clone();  // [B, C] residual stream
  float* xp = x.data_ptr<float>();
  const int64_t state_elems[3] = {B * C, B * H * kHeadSize * kHeadSize, B * C};
  for (int64_t l = 0; l < L; ++l) {
    const float* in[3];
    float* out[3];
    for (int64_t j = 0; j < 3; ++j) {
      const at::Tensor &ti = state_in[3 * l + j], &to = state_out[3 * l + j];
      TORCH_CHECK(ti.scalar_type() == at::kFloat && ti.is_contiguous() && ti.numel() == state_elems[j] &&
                      to.scalar_type() == at::kFloat && to.is_contiguous() && to.numel() == state_elems[j],
                  "decode_step: state tensor ", j, " of layer ", l, " must be ", state_elems[j],
                  " contiguous float32 values");
      in[j] = ti.data_ptr<float>();
      out[j] = to.data_ptr<float>();
    }
    const LayerState s{in[0], in[1], in[2], out[0], out[1], out[2]};
    TORCH_CHECK((p[l * LAYER_PARAMS + V0].numel() > 0) == (l > 0),
                "decode_step: only layers after the first have a value-mix LoRA");
    time_mix(p, l, s, xp, B, C, H, bf);
    channel_mix(p, l, s, xp, B, C, bf);
  }
  const int64_t f = L * LAYER_PARAMS;
  layer_norm(xp, B, C, vec(p[f], C, "ln_out.weight"), vec(p[f + 1], C, "ln_out.bias"), 1e-5f, bf.h.data());
  const Linear head = linear(bf.q4_a8, p[f + 2], p[f + 3], C, "head");
  at::Tensor logits = at::empty({B, head.O}, x.options());
  head.apply(bf.h.data(), B, logits.data_ptr<float>(), false);
  return logits;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(rwkv_nvim_cpu, m) {
  m.def("decode_step(Tensor x, Tensor[] params, Tensor[] state_in, Tensor[] state_out, int n_head, bool q4_a8=False) -> Tensor");
}

TORCH_LIBRARY_IMPL(rwkv_nvim_cpu, CPU, m) { m.impl("decode_step", &decode_step); }
