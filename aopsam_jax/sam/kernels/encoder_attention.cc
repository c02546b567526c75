// Attention of SAM's image encoder for x86-64 CPUs with AVX-512, float32:
// the global blocks' (GlobalAttention) and the windowed blocks' (WindowAttention).
//
//   out[i] = softmax_j(scale * q_i . k_j + rel_h[i, y_j] + rel_w[i, x_j]) v_j
//   rel_h[i, y'] = q_i . Rh[y_i, y', :],  rel_w[i, x'] = q_i . Rw[x_i, x', :]  (unscaled q)
//
// over the whole grid (global) or inside each ws x ws window.  One XLA FFI
// call per global block, or per row of windows; q/k/v are read straight from
// the token-major qkv projection and the output is written token-major for proj.
// Why a kernel: XLA:CPU runs these matmuls (contraction 64 for q k^T, 64 output
// columns for p v; 196 x 196 per window) at 25-45 % of its dense matmul rate
// and scales them to two threads by 1.5-1.7x.  Here each (image, head, band of
// query rows), or (window, head), is one task on XLA's intra-op thread pool,
// and every product runs from L1 in register tiles at the core's FMA rate
// (measured 260-270 GFLOP/s per Zen 5 core).
//
// Exact softmax per query row (the row maximum first, then exp and p v); global
// attention in blocks of about 64 queries whose logits (64 x N) stay in L2.
// Requires: head dim a multiple of 16 up to 80; global: grid H and W multiples
// of 16; windowed: an even window of at most 16.
// Built by aopsam_jax/sam/cpu_kernels.py with -O3 -mavx512f -mfma.

#include <immintrin.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Keeps a loaded vector in a register: without it GCC folds the load into
// every FMA that uses it, one 512-bit load per FMA, and the tile runs at
// ~115 instead of ~265 GFLOP/s (load-port bound).
#define AOP_PIN(x) __asm__("" : "+v"(x))

constexpr int kRows = 4;          // rows of a register tile
constexpr int64_t kKeyChunk = 64;  // keys per logits tile
constexpr int64_t kPvChunk = 128;  // keys per p v pass (a 128 x hd slice of v stays in L1)
constexpr int64_t kBlock = 64;     // queries per softmax block (64 x N logits stay in L2)

// exp for float32 (Cephes polynomial on [-ln2/2, ln2/2], ~1 ulp), 2^n by vscalefps.
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-104.0f));  // exp(-104) is 0 in float32 anyway
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
  return _mm512_scalef_ps(p, n);
}

// c[R x 16V] (+)= a[R x k] b[k x 16V]; a rows at stride lda, b rows at ldb.
// Not inlined: inlined into a larger loop nest GCC allocated the registers
// worse (measured 180 vs 265 GFLOP/s).
template <int R, int V>
__attribute__((noinline)) void gemm_tile(const float* a, int64_t lda, const float* b, int64_t ldb,
                                         int64_t k, float* c, int64_t ldc, bool accumulate) {
  __m512 acc[R][V];
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v)
      acc[r][v] = accumulate ? _mm512_loadu_ps(c + r * ldc + 16 * v) : _mm512_setzero_ps();
  for (int64_t kk = 0; kk < k; ++kk) {
    __m512 bv[V];
    for (int v = 0; v < V; ++v) {
      bv[v] = _mm512_loadu_ps(b + kk * ldb + 16 * v);
      AOP_PIN(bv[v]);
    }
    for (int r = 0; r < R; ++r) {
      const __m512 av = _mm512_set1_ps(a[r * lda + kk]);
      for (int v = 0; v < V; ++v) acc[r][v] = _mm512_fmadd_ps(av, bv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < R; ++r)
    for (int v = 0; v < V; ++v) _mm512_storeu_ps(c + r * ldc + 16 * v, acc[r][v]);
}

template <int V>
void gemm_rows(int64_t m, const float* a, int64_t lda, const float* b, int64_t ldb, int64_t k,
               float* c, int64_t ldc, bool accumulate) {
  int64_t r = 0;
  for (; r + kRows <= m; r += kRows)
    gemm_tile<kRows, V>(a + r * lda, lda, b, ldb, k, c + r * ldc, ldc, accumulate);
  for (; r < m; ++r) gemm_tile<1, V>(a + r * lda, lda, b, ldb, k, c + r * ldc, ldc, accumulate);
}

// c[m x n] (+)= a[m x k] b[k x n] for n a multiple of 16, in column chunks of
// at most 64 (or 80: a head dim of 80 in one pass).
void gemm(int64_t m, int64_t n, const float* a, int64_t lda, const float* b, int64_t ldb,
          int64_t k, float* c, int64_t ldc, bool accumulate) {
  for (int64_t j = 0; j < n;) {
    const int64_t v = (n - j == 80) ? 5 : std::min<int64_t>(4, (n - j) / 16);
    switch (v) {
      case 5: gemm_rows<5>(m, a, lda, b + j, ldb, k, c + j, ldc, accumulate); break;
      case 4: gemm_rows<4>(m, a, lda, b + j, ldb, k, c + j, ldc, accumulate); break;
      case 3: gemm_rows<3>(m, a, lda, b + j, ldb, k, c + j, ldc, accumulate); break;
      case 2: gemm_rows<2>(m, a, lda, b + j, ldb, k, c + j, ldc, accumulate); break;
      default: gemm_rows<1>(m, a, lda, b + j, ldb, k, c + j, ldc, accumulate); break;
    }
    j += 16 * v;
  }
}

// Logits of kRows queries x kKeyChunk keys plus the rel-pos bias, stored to
// s (row stride ls) and folded into the rows' running maxima.  kt is the key
// chunk packed (hd x kKeyChunk), which starts at key j0 = (y0, x0) of a grid
// w keys wide (w % 16 == 0).  The bias is added after the dot (as XLA does):
// accumulating the dot onto it would round every partial sum at the bias's
// magnitude (4x the error, measured against float64).
__attribute__((noinline)) void logits_tile(const float* qs, int64_t hd, const float* kt,
                                           const float* rh, int64_t nh_cols, const float* rw,
                                           int64_t nw_cols, int64_t j0, int64_t y0, int64_t x0,
                                           int64_t w, float* s, int64_t ls, __m512* row_max) {
  __m512 acc[kRows][4];
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t d = 0; d < hd; ++d) {
    __m512 kv[4];
    for (int c = 0; c < 4; ++c) {
      kv[c] = _mm512_loadu_ps(kt + d * kKeyChunk + 16 * c);
      AOP_PIN(kv[c]);
    }
    for (int r = 0; r < kRows; ++r) {
      const __m512 qv = _mm512_set1_ps(qs[r * hd + d]);
      for (int c = 0; c < 4; ++c) acc[r][c] = _mm512_fmadd_ps(qv, kv[c], acc[r][c]);
    }
  }
  for (int c = 0, y = y0, x = x0; c < 4; ++c, x += 16) {
    if (x >= w) x -= w, ++y;  // no division in the tile: 16 | w
    for (int r = 0; r < kRows; ++r)
      acc[r][c] = _mm512_add_ps(acc[r][c], _mm512_add_ps(_mm512_set1_ps(rh[r * nh_cols + y]),
                                                         _mm512_loadu_ps(rw + r * nw_cols + x)));
  }
  for (int r = 0; r < kRows; ++r) {
    __m512 m = row_max[r];
    for (int c = 0; c < 4; ++c) {
      _mm512_storeu_ps(s + r * ls + j0 + 16 * c, acc[r][c]);
      m = _mm512_max_ps(m, acc[r][c]);
    }
    row_max[r] = m;
  }
}

// exp(row - max) in place over n floats (n % 16 == 0) -> the row's sum.
// `running_max` holds 16 lanes whose maximum is the row's.
float softmax_numerators(float* row, int64_t n, __m512 running_max) {
  const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(running_max));
  __m512 acc = _mm512_setzero_ps();
  for (int64_t j = 0; j < n; j += 16) {
    const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(row + j), mx));
    _mm512_storeu_ps(row + j, e);
    acc = _mm512_add_ps(acc, e);
  }
  return _mm512_reduce_add_ps(acc);
}

struct AlignedFree {
  void operator()(float* p) const { std::free(p); }
};

// A thread's working memory, grown as needed and kept between calls.
struct Scratch {
  std::unique_ptr<float[], AlignedFree> mem;
  int64_t size = 0;
  float* get(int64_t floats) {
    if (floats > size) {
      const int64_t bytes = ((floats * 4 + 63) / 64) * 64;
      mem.reset(static_cast<float*>(std::aligned_alloc(64, bytes)));
      size = mem ? floats : 0;
    }
    return mem.get();
  }
};

struct Problem {
  const float* qkv;  // (B, H, W, 3C)
  const float* rht;  // (H, hd, H): Rh[y, y', d] as [y][d][y']
  const float* rwt;  // (W, hd, W)
  float* out;        // (B, H, W, C)
  int64_t h, w, heads, hd, splits;
  float scale;
  int64_t n() const { return h * w; }
  int64_t c() const { return heads * hd; }
};

// One task: image b, head `head`, grid rows [ya, yb).
void run_task(const Problem& p, int64_t b, int64_t head, int64_t ya, int64_t yb) {
  static thread_local Scratch scratch;
  const int64_t n = p.n(), hd = p.hd, w = p.w, h = p.h, stride = 3 * p.c();
  const int64_t rows = (yb - ya) * w;  // queries of this task
  const int64_t qb = std::max<int64_t>(1, kBlock / w) * w;  // queries per softmax block
  const int64_t ls = n + 16;  // logits row stride: not a multiple of 4 KB
  float* kt = scratch.get(2 * n * hd + rows * (h + w) + qb * (ls + 2 * hd) + 2 * qb);
  float* v = kt + n * hd;
  float* rel_h = v + n * hd;
  float* rel_w = rel_h + rows * h;
  float* s = rel_w + rows * w;
  float* qs = s + qb * ls;
  float* o = qs + qb * hd;
  float* sums = o + qb * hd;
  const float* base = p.qkv + b * n * stride;
  const float* q = base + head * hd;
  const float* k = base + p.c() + head * hd;
  const float* vsrc = base + 2 * p.c() + head * hd;

  // k packed in chunks of kKeyChunk keys, each (hd x kKeyChunk); v (n x hd).
  for (int64_t j = 0; j < n; ++j) {
    float* chunk = kt + (j / kKeyChunk) * kKeyChunk * hd + j % kKeyChunk;
    for (int64_t d = 0; d < hd; ++d) chunk[d * kKeyChunk] = k[j * stride + d];
    std::copy(vsrc + j * stride, vsrc + j * stride + hd, v + j * hd);
  }
  // rel-pos terms of the task's queries, as small matmuls: one per grid row
  // (its w queries against Rh[y]) and one per grid column.
  for (int64_t y = ya; y < yb; ++y)
    gemm(w, h, q + y * w * stride, stride, p.rht + y * hd * h, h, hd,
         rel_h + (y - ya) * w * h, h, false);
  for (int64_t x = 0; x < w; ++x)
    gemm(yb - ya, w, q + (ya * w + x) * stride, w * stride, p.rwt + x * hd * w, w, hd,
         rel_w + x * w, w * w, false);

  static thread_local std::vector<__m512> row_max;  // one per query of a block
  row_max.resize(qb);
  float* dst = p.out + b * n * p.c() + head * hd;
  for (int64_t i0 = 0; i0 < rows; i0 += qb) {
    const int64_t m = std::min(qb, rows - i0), t0 = ya * w + i0;  // t0: first query's token
    for (int64_t i = 0; i < m; ++i)
      for (int64_t d = 0; d < hd; ++d) qs[i * hd + d] = q[(t0 + i) * stride + d] * p.scale;
    for (int64_t i = 0; i < m; ++i) row_max[i] = _mm512_set1_ps(-INFINITY);
    for (int64_t j0 = 0; j0 < n; j0 += kKeyChunk)
      for (int64_t i = 0; i < m; i += kRows)
        logits_tile(qs + i * hd, hd, kt + j0 * hd, rel_h + (i0 + i) * h, h, rel_w + (i0 + i) * w,
                    w, j0, j0 / w, j0 % w, w, s + i * ls, ls, row_max.data() + i);
    for (int64_t i = 0; i < m; ++i) sums[i] = softmax_numerators(s + i * ls, n, row_max[i]);
    for (int64_t k0 = 0; k0 < n; k0 += kPvChunk)
      gemm(m, hd, s + k0, ls, v + k0 * hd, hd, std::min(kPvChunk, n - k0), o, hd, k0 > 0);
    for (int64_t i = 0; i < m; ++i)
      for (int64_t d = 0; d < hd; ++d) dst[(t0 + i) * p.c() + d] = o[i * hd + d] / sums[i];
  }
}

// Window attention: one (row of windows, window, head) per task.  The row
// comes without its padding columns: those tokens are zero inputs in the
// official code, so their q, k, v are the qkv bias, which the kernel uses in
// their place; their queries' outputs are cropped away, so they are not computed.
struct WindowProblem {
  const float* qkv;   // (N, ws, w, 3C): rows of windows, w real columns
  const float* bias;  // (3C,): the qkv projection's bias (a padding token's q, k, v)
  const float* rht;   // (ws, hd, 16): Rh[a, a', d] as [a][d][a'], zero beyond a' = ws
  const float* rwt;   // (ws, hd, 16)
  float* out;         // (N, ws, w, C)
  int64_t ws, w, heads, hd;
  float scale;
  int64_t c() const { return heads * hd; }
  int64_t windows() const { return (w + ws - 1) / ws; }
};

// Logits of kRows queries x 16V keys of a window (kp keys: t = ws^2 real,
// the rest padding at -inf), plus the rel-pos bias gathered per lane from
// the query's rel_h / rel_w rows (16 floats each) by the key's (row, column).
template <int V>
__attribute__((noinline)) void window_logits_tile(const float* qs, int64_t hd, const float* kt,
                                                  int64_t kp, int64_t jv, const float* rh,
                                                  const float* rw, const __m512i* key_row,
                                                  const __m512i* key_col, const __mmask16* real,
                                                  float* s, int64_t ls, __m512* row_max) {
  __m512 acc[kRows][V];
  for (int r = 0; r < kRows; ++r)
    for (int c = 0; c < V; ++c) acc[r][c] = _mm512_setzero_ps();
  for (int64_t d = 0; d < hd; ++d) {
    __m512 kv[V];
    for (int c = 0; c < V; ++c) {
      kv[c] = _mm512_loadu_ps(kt + d * kp + 16 * (jv + c));
      AOP_PIN(kv[c]);
    }
    for (int r = 0; r < kRows; ++r) {
      const __m512 qv = _mm512_set1_ps(qs[r * hd + d]);
      for (int c = 0; c < V; ++c) acc[r][c] = _mm512_fmadd_ps(qv, kv[c], acc[r][c]);
    }
  }
  const __m512 minus_inf = _mm512_set1_ps(-INFINITY);
  for (int r = 0; r < kRows; ++r) {
    const __m512 hrow = _mm512_loadu_ps(rh + r * 16), wrow = _mm512_loadu_ps(rw + r * 16);
    __m512 m = row_max[r];
    for (int c = 0; c < V; ++c) {
      const __m512 bias = _mm512_add_ps(_mm512_permutexvar_ps(key_row[jv + c], hrow),
                                        _mm512_permutexvar_ps(key_col[jv + c], wrow));
      const __m512 val = _mm512_mask_mov_ps(minus_inf, real[jv + c], _mm512_add_ps(acc[r][c], bias));
      _mm512_storeu_ps(s + r * ls + 16 * (jv + c), val);
      m = _mm512_max_ps(m, val);
    }
    row_max[r] = m;
  }
}

void run_window(const WindowProblem& p, int64_t row, int64_t win, int64_t head) {
  static thread_local Scratch scratch;
  const int64_t ws = p.ws, hd = p.hd, t = ws * ws, kp = (t + 15) / 16 * 16, nv = kp / 16;
  const int64_t cols = std::min(ws, p.w - win * ws);  // real columns of this window
  const int64_t tq = ws * cols, tqp = (tq + kRows - 1) / kRows * kRows;  // its queries
  const int64_t stride = 3 * p.c(), ls = kp + 16;
  float* qs = scratch.get(tqp * (3 * hd + 32 + ls + 2) + t * hd + hd * kp);
  float* qraw = qs + tqp * hd;
  float* kt = qraw + tqp * hd;
  float* v = kt + hd * kp;
  float* rel_h = v + t * hd;
  float* rel_w = rel_h + tqp * 16;
  float* s = rel_w + tqp * 16;
  float* o = s + tqp * ls;
  float* sums = o + tqp * hd;
  const float* base = p.qkv + (row * ws * p.w + win * ws) * stride + head * hd;
  const float* pad = p.bias + head * hd;
  // window token (a, c) -> its q (k, v at + C, + 2C): the bias in the padding columns
  auto src = [&](int64_t a, int64_t c) { return c < cols ? base + (a * p.w + c) * stride : pad; };
  for (int64_t i = 0; i < t; ++i) {
    const float* x = src(i / ws, i % ws);
    for (int64_t d = 0; d < hd; ++d) kt[d * kp + i] = x[p.c() + d];
    std::copy(x + 2 * p.c(), x + 2 * p.c() + hd, v + i * hd);
  }
  for (int64_t d = 0; d < hd; ++d) std::fill(kt + d * kp + t, kt + (d + 1) * kp, 0.0f);
  for (int64_t i = 0; i < tqp; ++i) {  // query i = (a, c), c < cols; rows past tq: copies
    const float* x = src(std::min(i, tq - 1) / cols, std::min(i, tq - 1) % cols);
    std::copy(x, x + hd, qraw + i * hd);
    for (int64_t d = 0; d < hd; ++d) qs[i * hd + d] = x[d] * p.scale;
  }
  // rel-pos terms (unscaled q): per window row against Rh[a], per column against Rw[c].
  for (int64_t a = 0; a < ws; ++a)
    gemm(cols, 16, qraw + a * cols * hd, hd, p.rht + a * hd * 16, 16, hd,
         rel_h + a * cols * 16, 16, false);
  for (int64_t c = 0; c < cols; ++c)
    gemm(ws, 16, qraw + c * hd, cols * hd, p.rwt + c * hd * 16, 16, hd,
         rel_w + c * 16, cols * 16, false);
  for (int64_t i = tq; i < tqp; ++i) {  // the copies' rel-pos rows
    std::copy(rel_h + (tq - 1) * 16, rel_h + tq * 16, rel_h + i * 16);
    std::copy(rel_w + (tq - 1) * 16, rel_w + tq * 16, rel_w + i * 16);
  }
  __m512i key_row[16], key_col[16];
  __mmask16 real[16];
  for (int64_t jv = 0; jv < nv; ++jv) {
    alignas(64) int32_t kr[16], kc[16];
    for (int l = 0; l < 16; ++l) {
      const int64_t j = std::min(16 * jv + l, t - 1);
      kr[l] = static_cast<int32_t>(j / ws);
      kc[l] = static_cast<int32_t>(j % ws);
    }
    key_row[jv] = _mm512_load_si512(kr);
    key_col[jv] = _mm512_load_si512(kc);
    const int64_t left = t - 16 * jv;
    real[jv] = left >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << left) - 1);
  }
  __m512 row_max[kRows];
  for (int64_t i = 0; i < tqp; i += kRows) {
    for (int r = 0; r < kRows; ++r) row_max[r] = _mm512_set1_ps(-INFINITY);
    for (int64_t jv = 0; jv < nv; jv += 4) {
      const float *q4 = qs + i * hd, *rh = rel_h + i * 16, *rw = rel_w + i * 16;
      float* s4 = s + i * ls;
      switch (std::min<int64_t>(4, nv - jv)) {
        case 4: window_logits_tile<4>(q4, hd, kt, kp, jv, rh, rw, key_row, key_col, real, s4, ls, row_max); break;
        case 3: window_logits_tile<3>(q4, hd, kt, kp, jv, rh, rw, key_row, key_col, real, s4, ls, row_max); break;
        case 2: window_logits_tile<2>(q4, hd, kt, kp, jv, rh, rw, key_row, key_col, real, s4, ls, row_max); break;
        default: window_logits_tile<1>(q4, hd, kt, kp, jv, rh, rw, key_row, key_col, real, s4, ls, row_max); break;
      }
    }
    for (int r = 0; r < kRows; ++r)
      sums[i + r] = softmax_numerators(s + (i + r) * ls, kp, row_max[r]);
  }
  gemm(tqp, hd, s, ls, v, hd, t, o, hd, false);
  float* dst = p.out + (row * ws * p.w + win * ws) * p.c() + head * hd;
  for (int64_t i = 0; i < tq; ++i)
    for (int64_t d = 0; d < hd; ++d)
      dst[((i / cols) * p.w + i % cols) * p.c() + d] = o[i * hd + d] / sums[i];
}

// run(0 .. tasks-1) on the caller and on workers scheduled on XLA's pool,
// pulling task numbers from a shared counter; returns once no task is left
// and none is running.  A worker that starts late finds no task and touches
// only the shared state, which it co-owns.
struct TaskQueue {
  std::atomic<int64_t> next{0}, active{0};
  std::mutex mu;
  std::condition_variable cv;
};

template <typename Run>
void drain(const Run& run, int64_t tasks, TaskQueue& queue) {
  queue.active.fetch_add(1);
  for (int64_t t; (t = queue.next.fetch_add(1)) < tasks;) run(t);
  if (queue.active.fetch_sub(1) == 1) {
    std::lock_guard<std::mutex> lock(queue.mu);
    queue.cv.notify_all();
  }
}

template <typename Run>
void parallel_for(ffi::ThreadPool& pool, int64_t tasks, const Run& run) {
  auto queue = std::make_shared<TaskQueue>();
  const int64_t workers = std::min<int64_t>(std::max<int64_t>(1, pool.num_threads()), tasks) - 1;
  for (int64_t i = 0; i < workers; ++i) pool.Schedule([run, tasks, queue] { drain(run, tasks, *queue); });
  drain(run, tasks, *queue);
  std::unique_lock<std::mutex> lock(queue->mu);
  queue->cv.wait(lock, [&] { return queue->active.load() == 0; });
}

bool head_dim_ok(int64_t hd) { return hd > 0 && hd % 16 == 0 && hd <= 80; }

ffi::Error GlobalAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                           ffi::Buffer<ffi::F32> rht, ffi::Buffer<ffi::F32> rwt,
                           ffi::ResultBuffer<ffi::F32> out, int64_t num_heads, float scale) {
  const auto dims = qkv.dimensions();
  if (dims.size() != 4 || num_heads <= 0 || dims[3] % (3 * num_heads))
    return ffi::Error::InvalidArgument("global_attention: qkv must be (B, H, W, 3 * heads * hd)");
  Problem p{qkv.typed_data(), rht.typed_data(), rwt.typed_data(), out->typed_data(),
            dims[1], dims[2], num_heads, dims[3] / (3 * num_heads), 1, scale};
  if (!head_dim_ok(p.hd) || p.h % 16 || p.w % 16)
    return ffi::Error::InvalidArgument("global_attention: head dim, H and W must be multiples of 16");
  const int64_t threads = std::max<int64_t>(1, pool.num_threads()), pairs = dims[0] * num_heads;
  // Enough tasks to keep every thread busy: split heads into bands of rows
  // when there are fewer (image, head) pairs than a multiple of the threads.
  while ((pairs * p.splits) % threads && p.splits < p.h / 16) ++p.splits;
  parallel_for(pool, pairs * p.splits, [p](int64_t t) {
    const int64_t z = t / p.splits, part = t % p.splits;
    run_task(p, z / p.heads, z % p.heads, p.h * part / p.splits, p.h * (part + 1) / p.splits);
  });
  return ffi::Error::Success();
}

ffi::Error WindowAttention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> qkv,
                           ffi::Buffer<ffi::F32> bias, ffi::Buffer<ffi::F32> rht,
                           ffi::Buffer<ffi::F32> rwt, ffi::ResultBuffer<ffi::F32> out,
                           int64_t num_heads, float scale) {
  const auto dims = qkv.dimensions();
  if (dims.size() != 4 || num_heads <= 0 || dims[3] % (3 * num_heads) ||
      bias.element_count() != dims[3])
    return ffi::Error::InvalidArgument(
        "window_attention: qkv must be (N, ws, w, 3 * heads * hd), bias (3 * heads * hd,)");
  WindowProblem p{qkv.typed_data(), bias.typed_data(), rht.typed_data(), rwt.typed_data(),
                  out->typed_data(), dims[1], dims[2], num_heads, dims[3] / (3 * num_heads),
                  scale};
  if (!head_dim_ok(p.hd) || p.ws > 16 || p.ws % 2)
    return ffi::Error::InvalidArgument("window_attention: needs an even window <= 16, head dim 16k <= 80");
  const int64_t per_row = p.windows() * num_heads;
  parallel_for(pool, dims[0] * per_row, [p, per_row](int64_t t) {
    run_window(p, t / per_row, (t % per_row) / p.heads, t % p.heads);
  });
  return ffi::Error::Success();
}

}  // namespace

#define AOPSAM_ATTENTION_BINDING                 \
  ffi::Ffi::Bind()                               \
      .Ctx<ffi::ThreadPool>()                    \
      .Arg<ffi::Buffer<ffi::F32>>()              \
      .Arg<ffi::Buffer<ffi::F32>>()              \
      .Arg<ffi::Buffer<ffi::F32>>()              \
      .Ret<ffi::Buffer<ffi::F32>>()              \
      .Attr<int64_t>("num_heads")                \
      .Attr<float>("scale")

XLA_FFI_DEFINE_HANDLER_SYMBOL(AopsamGlobalAttention, GlobalAttention, AOPSAM_ATTENTION_BINDING);
XLA_FFI_DEFINE_HANDLER_SYMBOL(AopsamWindowAttention, WindowAttention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("num_heads")
                                  .Attr<float>("scale"));
