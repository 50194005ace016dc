"""Native (C++) CPU ops for the rollout engine's compiled steps: ``miles_cpu::moe_experts``,
``miles_cpu::grouped_linear`` and ``miles_cpu::decode_attention``.

Why. Inductor has no fp32 ``_grouped_mm`` on the CPU, so the compiled steps (rollout/steps.py) ran the
expert GEMMs through the Python custom op ``miles::grouped_linear``: every one of the 2 x
num_moe_layers calls per step went from inductor's C++ wrapper back into Python, and
``torch._grouped_mm``'s CPU fallback then multiplied the experts one after another on one core, with
the sort / gather / SiLU / scatter / weighted sum around it as separate graph kernels. These ops are
C++ (the wrapper calls them through the dispatcher) and spread the experts over the intra-op
threads.

    moe_experts:     experts_forward (model/moe.py), one call per MoE layer, fp32
        order  = the (token, k) pairs stably sorted by expert (counting sort)
        h      = x[order / K] @ gate_up[e]^T, a = silu(h[:, :F]) * h[:, F:], y = a @ down[e]^T
        out[n] = sum_k w[n, k] * y[rank(n, k)]        (products rounded, summed in k order)
    grouped_linear:  y[offs[e-1]:offs[e]] = x[offs[e-1]:offs[e]] @ w[e]^T  (any dtype ATen's mm takes)

Experts are cut into ``min(threads, E)`` contiguous chunks of about equal row counts (expert e goes
to chunk floor(T * mid_e / M), mid_e = its middle row); each thread runs its chunk. A GEMM is the
one BLAS call ATen's CPU ``mm`` makes for the same operands (``sgemm_`` for fp32,
``at::cpu::mm_out`` otherwise) and SiLU / multiply are ATen's CPU kernels, so on one intra-op
thread the results are bitwise those of ``experts_forward`` / ``grouped_linear``. On several, each
expert's GEMM runs on one thread inside its chunk, while eager MKL may split a GEMM across threads
and round the last bits differently (within 1e-6 relative in tests/test_native_cpu.py).

    decode_attention:  one decode query per sequence against its cached keys [0, pos_b] (fp32):
        per (sequence, head) the scores, a max-subtracted softmax and the weighted sum of the value
        rows in one pass (rollout/kv_cache.py); within fp32 rounding of SDPA with the same mask.

Inference only: no autograd formulas; the engine's compiled steps run without gradients.

Built on first use with ``torch.utils.cpp_extension.load_inline`` (~30 s on 2 cores; cached under
``TORCH_EXTENSIONS_DIR``, default ``~/.cache/torch_extensions``). The compiled CPU step needs a C++
compiler anyway (inductor's C++ kernels); if the build fails, ``load`` says why in a warning and
the compiled steps keep the Python custom op.
"""

from __future__ import annotations

import threading
import warnings

import torch

_SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <ATen/ops/mm_cpu_dispatch.h>
#include <ATen/ops/mul_cpu_dispatch.h>
#include <ATen/ops/silu_cpu_dispatch.h>
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <limits>
#include <vector>

// "<what><value><middle><limit><end>" as one std::string. TORCH_CHECK formatting integer arguments
// itself crashed (SIGSEGV) in this extension under torch 2.11 / g++ 13.3 on the H200 host.
inline std::string bad_value(const char* what, int64_t value, const char* middle, int64_t limit, const char* end) {
  return std::string(what) + std::to_string(value) + middle + std::to_string(limit) + end;
}

// Splits experts [0, E) into T = min(threads, E) contiguous ranges of about equal row counts: a
// non-empty expert e (rows [s, s + n) of M) goes to chunk min(T - 1, floor(T * (s + n / 2) / M)),
// an empty one stays with the expert before it. body(lo, hi) runs once per chunk (experts
// [lo, hi), possibly none), the chunks in parallel.
template <typename F>
void for_expert_chunks(const std::vector<int64_t>& start, int64_t M, F body) {
  const int64_t E = static_cast<int64_t>(start.size()) - 1;
  const int64_t T = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), E));
  if (M == 0) return;
  std::vector<int64_t> lo(T + 1, E);  // chunk c runs experts [lo[c], lo[c + 1])
  lo[0] = 0;
  for (int64_t e = 0, owner = 0; e < E; ++e) {
    const int64_t s = start[e], n = start[e + 1] - s;
    if (n == 0) continue;
    const int64_t c = std::min<int64_t>(T - 1, T * (2 * s + n) / (2 * M));
    while (owner < c) lo[++owner] = e;
  }
  if (T == 1) { body(0, E); return; }
  at::parallel_for(0, T, 1, [&](int64_t b, int64_t end) { for (int64_t c = b; c < end; ++c) body(lo[c], lo[c + 1]); });
}

// y [n, O] = x [n, I] @ w[O, I]^T, all row-major and contiguous, as the one BLAS call ATen's CPU mm
// makes for these operands: in BLAS's column-major terms y^T [O, n] = op_t(w as [I, O]) @ x^T [I, n],
// i.e. sgemm('t', 'n', O, n, I). No tensors are built per expert; the result is bitwise at::mm's
// (tests/test_native_cpu.py).
extern "C" void sgemm_(const char* transa, const char* transb, const int* m, const int* n, const int* k,
                       const float* alpha, const float* a, const int* lda, const float* b, const int* ldb,
                       const float* beta, float* c, const int* ldc);

inline void row_major_linear(const float* x, const float* w, float* y, int64_t n, int64_t O, int64_t I) {
  const int m_ = static_cast<int>(O), n_ = static_cast<int>(n), k_ = static_cast<int>(I);
  const float one = 1.0f, zero = 0.0f;
  const char t = 't', nt = 'n';
  sgemm_(&t, &nt, &m_, &n_, &k_, &one, w, &k_, x, &k_, &zero, y, &m_);
}

at::Tensor grouped_linear(const at::Tensor& x, const at::Tensor& w, const at::Tensor& offs) {
  TORCH_CHECK(x.dim() == 2 && w.dim() == 3 && offs.dim() == 1,
              "miles_cpu::grouped_linear: expected x [M, I], w [E, O, I], offs [E]");
  TORCH_CHECK(x.scalar_type() == w.scalar_type(), "miles_cpu::grouped_linear: x and w dtypes differ");
  TORCH_CHECK(offs.scalar_type() == at::kInt && offs.size(0) == w.size(0) && x.size(1) == w.size(2),
              "miles_cpu::grouped_linear: offs must be int32 [E] and x, w must share the inner dim");
  const int64_t E = w.size(0), M = x.size(0);
  const at::Tensor oc = offs.contiguous();
  const int32_t* o = oc.data_ptr<int32_t>();
  std::vector<int64_t> start(E + 1, 0);
  for (int64_t e = 0; e < E; ++e) {
    TORCH_CHECK(o[e] >= start[e], "miles_cpu::grouped_linear: offs must be non-decreasing");
    start[e + 1] = o[e];
  }
  TORCH_CHECK(start[E] == M, "miles_cpu::grouped_linear: offs[-1] must equal the row count");
  at::Tensor y = at::empty({M, w.size(1)}, x.options());
  for_expert_chunks(start, M, [&](int64_t lo, int64_t hi) {
    for (int64_t e = lo; e < hi; ++e) {
      const int64_t s = start[e], n = start[e + 1] - s;
      if (n == 0) continue;
      at::Tensor ys = y.narrow(0, s, n);
      at::cpu::mm_out(ys, x.narrow(0, s, n), w.select(0, e).t());
    }
  });
  return y;
}

// The whole routed-experts forward of one MoE layer (fp32), experts_forward's steps in one call:
//   order   = the (token, k) pairs stably sorted by expert (a counting sort)
//   h_M2F   = x[order / K] @ gate_up[e]^T             per expert e (its rows of the sorted pairs)
//   a_MF    = silu(h[:, :F]) * h[:, F:]               (ATen's CPU kernels, as in eager)
//   y_MD    = a @ down[e]^T                           per expert e
//   out[n]  = sum_k w[n, k] * y[rank(n, k)]           products rounded, then summed in k order
at::Tensor moe_experts(const at::Tensor& x, const at::Tensor& ids, const at::Tensor& wts,
                       const at::Tensor& gate_up, const at::Tensor& down) {
  TORCH_CHECK(x.dim() == 2 && ids.dim() == 2 && wts.sizes() == ids.sizes() && ids.size(0) == x.size(0),
              "miles_cpu::moe_experts: expected x [N, D], ids and weights [N, K]");
  TORCH_CHECK(x.scalar_type() == at::kFloat && wts.scalar_type() == at::kFloat &&
              gate_up.scalar_type() == at::kFloat && down.scalar_type() == at::kFloat &&
              ids.scalar_type() == at::kLong, "miles_cpu::moe_experts: float32 tensors and int64 ids expected");
  const int64_t N = x.size(0), D = x.size(1), K = ids.size(1), M = N * K;
  TORCH_CHECK(M < (int64_t(1) << 31) && x.numel() < (int64_t(1) << 31), "miles_cpu::moe_experts: too many rows");
  const int64_t E = gate_up.size(0), F2 = gate_up.size(1), F = F2 / 2;
  TORCH_CHECK(gate_up.dim() == 3 && gate_up.size(2) == D && F2 % 2 == 0 && down.dim() == 3 &&
              down.size(0) == E && down.size(1) == D && down.size(2) == F,
              "miles_cpu::moe_experts: expected gate_up [E, 2F, D] and down [E, D, F]");
  const at::Tensor xc = x.contiguous(), ic = ids.contiguous(), wc = wts.contiguous();
  const int64_t* id = ic.data_ptr<int64_t>();
  std::vector<int64_t> start(E + 1, 0), fill(E, 0), order(M), rank(M);
  for (int64_t p = 0; p < M; ++p) {
    if (id[p] < 0 || id[p] >= E) {  // message built as one std::string (see bad_value)
      TORCH_CHECK(false, bad_value("miles_cpu::moe_experts: expert id ", id[p], " out of range [0, ", E, ")"));
    }
    ++start[id[p] + 1];
  }
  for (int64_t e = 0; e < E; ++e) start[e + 1] += start[e];
  for (int64_t p = 0; p < M; ++p) {
    const int64_t r = start[id[p]] + fill[id[p]]++;
    order[r] = p;
    rank[p] = r;
  }
  at::Tensor xs = at::empty({M, D}, x.options()), h = at::empty({M, F2}, x.options());
  at::Tensor a = at::empty({M, F}, x.options()), y = at::empty({M, D}, x.options());
  const at::Tensor guc = gate_up.contiguous(), dnc = down.contiguous();
  const float* xp = xc.data_ptr<float>();
  float *xsp = xs.data_ptr<float>(), *hp = h.data_ptr<float>(), *ap = a.data_ptr<float>(), *yp = y.data_ptr<float>();
  const float *gup = guc.data_ptr<float>(), *dnp = dnc.data_ptr<float>();
  for_expert_chunks(start, M, [&](int64_t lo, int64_t hi) {
    for (int64_t e = lo; e < hi; ++e) {  // gather the expert's rows, gate_up GEMM
      const int64_t s = start[e], n = start[e + 1] - s;
      for (int64_t r = s; r < s + n; ++r) std::memcpy(xsp + r * D, xp + (order[r] / K) * D, D * sizeof(float));
      if (n > 0) row_major_linear(xsp + s * D, gup + e * F2 * D, hp + s * F2, n, F2, D);
    }
    const int64_t r0 = start[lo], r1 = start[hi];  // the chunk's rows: activation
    if (r1 > r0) {
      at::Tensor hs = h.narrow(0, r0, r1 - r0), as = a.narrow(0, r0, r1 - r0);
      at::cpu::silu_out(as, hs.narrow(1, 0, F));
      at::cpu::mul_out(as, as, hs.narrow(1, F, F));
    }
    for (int64_t e = lo; e < hi; ++e) {  // down GEMM
      const int64_t s = start[e], n = start[e + 1] - s;
      if (n > 0) row_major_linear(ap + s * F, dnp + e * D * F, yp + s * D, n, D, F);
    }
  });
  at::Tensor out = at::empty({N, D}, x.options());
  const float* wp = wc.data_ptr<float>();
  float* op = out.data_ptr<float>();
  at::parallel_for(0, N, 16, [&](int64_t b, int64_t end) {
    for (int64_t n = b; n < end; ++n) {
      float* o = op + n * D;
      const float* y0 = yp + rank[n * K] * D;
      const float w0 = wp[n * K];
      for (int64_t d = 0; d < D; ++d) o[d] = y0[d] * w0;
      for (int64_t k = 1; k < K; ++k) {
        const float* yk = yp + rank[n * K + k] * D;
        const float wk = wp[n * K + k];
        for (int64_t d = 0; d < D; ++d) o[d] = o[d] + yk[d] * wk;
      }
    }
  });
  return out;
}

// Decode attention of one new query per sequence against its cached keys (fp32):
//   q [B, H, 1, Hd], K / V [B, G, W, Hd] (views of the cache; any strides with a contiguous Hd),
//   pos [B]: sequence b attends to keys [0, pos[b]] (pos[b] < W); head h reads kv head h / (H / G).
//   s_w = <q, k_w> / sqrt(Hd),  p = softmax_w(s),  out = sum_w p_w v_w
// One (b, h) per task: the scores in a small buffer, max-subtracted exp, then the weighted sum of
// the value rows. Within rounding (fp32) of SDPA with the same mask (tests/test_native_cpu.py).
at::Tensor decode_attention(const at::Tensor& q, const at::Tensor& K, const at::Tensor& V, const at::Tensor& pos) {
  TORCH_CHECK(q.dim() == 4 && K.dim() == 4 && V.sizes() == K.sizes() && q.size(2) == 1 && q.size(0) == K.size(0) &&
              q.size(3) == K.size(3) && q.size(1) % K.size(1) == 0 && pos.dim() == 1 && pos.size(0) == q.size(0),
              "miles_cpu::decode_attention: expected q [B, H, 1, Hd], K and V [B, G, W, Hd], pos [B]");
  TORCH_CHECK(q.scalar_type() == at::kFloat && K.scalar_type() == at::kFloat && V.scalar_type() == at::kFloat &&
              pos.scalar_type() == at::kLong, "miles_cpu::decode_attention: float32 q, K, V and int64 pos expected");
  TORCH_CHECK(K.stride(3) == 1 && V.stride(3) == 1, "miles_cpu::decode_attention: K and V need a contiguous last dim");
  const int64_t B = q.size(0), H = q.size(1), G = K.size(1), W = K.size(2), Hd = q.size(3), rep = H / G;
  const at::Tensor qc = q.contiguous(), pc = pos.contiguous();
  const int64_t* pp = pc.data_ptr<int64_t>();
  for (int64_t b = 0; b < B; ++b) {
    if (pp[b] < 0 || pp[b] >= W) {
      TORCH_CHECK(false, bad_value("miles_cpu::decode_attention: pos ", pp[b], " outside the window of ", W, " keys"));
    }
  }
  at::Tensor out = at::empty({B, H, 1, Hd}, q.options());
  const float *qp = qc.data_ptr<float>(), *kp = K.data_ptr<float>(), *vp = V.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t kb = K.stride(0), kg = K.stride(1), kw = K.stride(2), vb = V.stride(0), vg = V.stride(1), vw = V.stride(2);
  const float scale = 1.0f / std::sqrt(static_cast<float>(Hd));
  at::parallel_for(0, B * H, 8, [&](int64_t begin, int64_t end) {
    std::vector<float> s(W);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / H, g = (bh % H) / rep, n = pp[b] + 1;
      const float* qv = qp + bh * Hd;
      const float* kbase = kp + b * kb + g * kg;
      const float* vbase = vp + b * vb + g * vg;
      float m = -std::numeric_limits<float>::infinity();
      for (int64_t w = 0; w < n; ++w) {
        const float* kr = kbase + w * kw;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t d = 0; d < Hd; ++d) dot += qv[d] * kr[d];
        s[w] = dot * scale;
        m = std::max(m, s[w]);
      }
      float sum = 0.0f;
      for (int64_t w = 0; w < n; ++w) {
        s[w] = std::exp(s[w] - m);
        sum += s[w];
      }
      float* o = op + bh * Hd;
      for (int64_t d = 0; d < Hd; ++d) o[d] = 0.0f;
      for (int64_t w = 0; w < n; ++w) {
        const float* vr = vbase + w * vw;
        const float p = s[w];
#pragma omp simd
        for (int64_t d = 0; d < Hd; ++d) o[d] += p * vr[d];
      }
      const float inv = 1.0f / sum;
      for (int64_t d = 0; d < Hd; ++d) o[d] *= inv;
    }
  });
  return out;
}

TORCH_LIBRARY(miles_cpu, m) {
  m.def("grouped_linear(Tensor x, Tensor w, Tensor offs) -> Tensor");
  m.def("moe_experts(Tensor x, Tensor ids, Tensor weights, Tensor gate_up, Tensor down) -> Tensor");
  m.def("decode_attention(Tensor q, Tensor K, Tensor V, Tensor pos) -> Tensor");
}
TORCH_LIBRARY_IMPL(miles_cpu, CPU, m) {
  m.impl("grouped_linear", &grouped_linear);
  m.impl("moe_experts", &moe_experts);
  m.impl("decode_attention", &decode_attention);
}
"""

_lock = threading.Lock()
_state: dict[str, object] = {"loaded": False, "error": None}


def available() -> bool:
    """True once ``load()`` has built and registered the ops in this process."""
    return bool(_state["loaded"])


def load() -> bool:
    """Build (or take from the extension cache) and register the ``miles_cpu`` ops; returns
    whether it is available. Safe to call many times and from several threads; a failed build is
    reported once (warning) and not retried in this process."""
    with _lock:
        if _state["loaded"] or _state["error"] is not None:
            return bool(_state["loaded"])
        try:
            from torch.utils.cpp_extension import load_inline

            name, flags = _build_flags()
            load_inline(name, cpp_sources=[_SOURCE], extra_cflags=flags, extra_ldflags=["-fopenmp"],
                        is_python_module=False)
        except Exception as exc:  # no compiler, no headers, ...: the Python op still works
            _state["error"] = f"{type(exc).__name__}: {exc}"
            warnings.warn("the miles_cpu ops could not be built, so the compiled CPU steps keep the "
                          f"slower Python custom op ({_state['error'].splitlines()[0]}); install a C++ "
                          "compiler (g++) to get it", RuntimeWarning, stacklevel=2)
            return False
        torch.library.register_fake("miles_cpu::grouped_linear")(_fake_grouped_linear)
        torch.library.register_fake("miles_cpu::moe_experts")(_fake_moe_experts)
        torch.library.register_fake("miles_cpu::decode_attention")(_fake_decode_attention)
        _state["loaded"] = True
        return True


def _build_flags() -> tuple[str, list[str]]:
    """(extension name, compiler flags). ``-fopenmp``: ATen's ``parallel_for`` in a header is serial
    without it. ``-ffp-contract=off``: no fused multiply-adds, so the weighted sum rounds as eager
    does. AVX2 code only where ATen itself runs AVX2 or better (the name keeps the builds apart)."""
    flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        return "miles_cpu_ops_avx2", flags + ["-mavx2", "-mfma"]
    return "miles_cpu_ops", flags


def _fake_grouped_linear(x_MI: torch.Tensor, w_EOI: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    return x_MI.new_empty(x_MI.shape[0], w_EOI.shape[1])


def _fake_moe_experts(x_ND, ids_NK, w_NK, gate_up_E2FD, down_EDF):
    return torch.empty_like(x_ND)


def _fake_decode_attention(q, K, V, pos):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def grouped_linear(x_MI: torch.Tensor, w_EOI: torch.Tensor, offs_E: torch.Tensor) -> torch.Tensor:
    """``y[offs[e-1]:offs[e]] = x[offs[e-1]:offs[e]] @ w[e]^T`` through the native op (after ``load()``)."""
    return torch.ops.miles_cpu.grouped_linear(x_MI, w_EOI, offs_E)


def moe_experts(x_ND: torch.Tensor, ids_NK: torch.Tensor, w_NK: torch.Tensor, gate_up_E2FD: torch.Tensor,
                down_EDF: torch.Tensor) -> torch.Tensor:
    """``experts_forward`` (fp32, plain grouped GEMMs) as one native call (after ``load()``)."""
    return torch.ops.miles_cpu.moe_experts(x_ND, ids_NK, w_NK, gate_up_E2FD, down_EDF)


def fp32_ops_ok(t: torch.Tensor) -> bool:
    """Whether ``moe_experts`` / ``decode_attention`` can take ``t`` (activations or query): the ops
    are built and ``t`` is fp32 on the CPU."""
    return available() and t.device.type == "cpu" and t.dtype == torch.float32


def decode_attention(q_BH1D: torch.Tensor, K_BGWD: torch.Tensor, V_BGWD: torch.Tensor, pos_B: torch.Tensor) -> torch.Tensor:
    """One decode query per sequence against its cached keys [0, pos_b] (fp32, after ``load()``)."""
    return torch.ops.miles_cpu.decode_attention(q_BH1D, K_BGWD, V_BGWD, pos_B)
