// jaxdec: y[r, o] = sum_i x[r, i] * W[o, i] for GGUF block-quantized W (Q4_1, Q8_0) and for float32 W
// (one layer of a stacked [L, out, in] matrix, read in place), as XLA FFI handlers.
// Weights are built per 32-element block in registers with gguf's float32 roundings
// (Q4_1: code * scale + offset, Q8_0: code * scale; compiled with -ffp-contract=off so these stay
// a multiply then an add); products are accumulated with FMA, 8 activation rows at a time.
#include <algorithm>
#include <atomic>
#include <cstdint>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <vector>
#include <immintrin.h>
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// block scales/offsets are float32 or float16 (GGUF stores float16; the conversion is exact)
inline float scalar(const float* p, int64_t i) { return p[i]; }
inline float scalar(const uint16_t* p, int64_t i) { return _cvtsh_ss(p[i]); }

#if defined(__AVX512F__)
// ---- AVX-512: 16 lanes; Q4_1 weights by a 16-entry table lookup (k * scale + offset for k = 0..15)
template <int R, int OT, typename S>
inline void q41_tile(const float* x, int64_t K, const uint8_t* codes, const S* scale, const S* offset, float* y,
                     int64_t N, int64_t o) {
  const int64_t nb = K / 32;
  const __m512 iota = _mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
  __m512 acc[OT][R];
  for (int t = 0; t < OT; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512 x0[R], x1[R];
    for (int r = 0; r < R; ++r) {
      x0[r] = _mm512_loadu_ps(x + r * K + b * 32);
      x1[r] = _mm512_loadu_ps(x + r * K + b * 32 + 16);
    }
    for (int t = 0; t < OT; ++t) {
      const int64_t ob = (o + t) * nb + b;
      __m512 table = _mm512_add_ps(_mm512_mul_ps(iota, _mm512_set1_ps(scalar(scale, ob))), _mm512_set1_ps(scalar(offset, ob)));
      __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + ob * 16)));
      __m512 lo = _mm512_permutexvar_ps(v, table);  // the permute reads the low 4 bits of each index
      __m512 hi = _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), table);
      for (int r = 0; r < R; ++r) {
        acc[t][r] = _mm512_fmadd_ps(x0[r], lo, acc[t][r]);
        acc[t][r] = _mm512_fmadd_ps(x1[r], hi, acc[t][r]);
      }
    }
  }
  for (int t = 0; t < OT; ++t)
    for (int r = 0; r < R; ++r) y[r * N + o + t] = _mm512_reduce_add_ps(acc[t][r]);
}

template <int R, int OT, typename S>
inline void q80_tile(const float* x, int64_t K, const int8_t* codes, const S* scale, float* y, int64_t N,
                     int64_t o) {
  const int64_t nb = K / 32;
  __m512 acc[OT][R];
  for (int t = 0; t < OT; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512 x0[R], x1[R];
    for (int r = 0; r < R; ++r) {
      x0[r] = _mm512_loadu_ps(x + r * K + b * 32);
      x1[r] = _mm512_loadu_ps(x + r * K + b * 32 + 16);
    }
    for (int t = 0; t < OT; ++t) {
      const int64_t ob = (o + t) * nb + b;
      const __m512 sv = _mm512_set1_ps(scalar(scale, ob));
      const int8_t* c = codes + ob * 32;
      __m512 w0 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(c)))), sv);
      __m512 w1 = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(
          _mm_loadu_si128(reinterpret_cast<const __m128i*>(c + 16)))), sv);
      for (int r = 0; r < R; ++r) {
        acc[t][r] = _mm512_fmadd_ps(x0[r], w0, acc[t][r]);
        acc[t][r] = _mm512_fmadd_ps(x1[r], w1, acc[t][r]);
      }
    }
  }
  for (int t = 0; t < OT; ++t)
    for (int r = 0; r < R; ++r) y[r * N + o + t] = _mm512_reduce_add_ps(acc[t][r]);
}
// ---- float32 weights: W[o, k] read as stored (a layer of a [L, N, K] stack in place)
// OT outputs per pass, the weight chunks in registers and each activation row loaded once per chunk;
// the last K % 16 elements by masked loads (masked-off lanes are neither read nor faulted).
template <int R> constexpr int f32_outputs() { return R <= 6 ? 4 : 3; }  // OT*R + OT + 1 <= 32 zmm

template <int R, int OT>
inline void f32_tile(const float* x, int64_t K, const float* w, float* y, int64_t N, int64_t o) {
  __m512 acc[OT][R];
  for (int t = 0; t < OT; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm512_setzero_ps();
  const float* wr = w + o * K;
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[OT];
    for (int t = 0; t < OT; ++t) wv[t] = _mm512_loadu_ps(wr + t * K + k);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_loadu_ps(x + r * K + k);
      for (int t = 0; t < OT; ++t) acc[t][r] = _mm512_fmadd_ps(xv, wv[t], acc[t][r]);
    }
  }
  if (k < K) {
    const __mmask16 m = static_cast<__mmask16>((1u << (K - k)) - 1u);
    __m512 wv[OT];
    for (int t = 0; t < OT; ++t) wv[t] = _mm512_maskz_loadu_ps(m, wr + t * K + k);
    for (int r = 0; r < R; ++r) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + r * K + k);
      for (int t = 0; t < OT; ++t) acc[t][r] = _mm512_fmadd_ps(xv, wv[t], acc[t][r]);
    }
  }
  for (int t = 0; t < OT; ++t)
    for (int r = 0; r < R; ++r) y[r * N + o + t] = _mm512_reduce_add_ps(acc[t][r]);
}
constexpr const char* kIsa = "avx512";

#if defined(__AVX512VNNI__) && defined(__AVX512BW__)
#define JAXDEC_HAS_Q8A 1
// ---- int8 activations (lossy, opt-in: activations="q8"): x is quantized per 32-element block to int8
// (dx = max|x| / 127, q = round-to-nearest-even(x / dx), as llama.cpp's Q8 activations), and the weights
// are repacked at load time so that one 64-byte load holds 4 consecutive codes of 16 output features:
// chunk c of block b for output group g is [16 outputs][4 bytes]. One vpdpbusd then does 64 products
// (u8 codes x s8 activations, exact int32 sums); each block's sums are scaled once per output lane:
//   Q4_1 (codes 0..15, byte i of a lane = code k | code k+4 << 4 for k = 8c + i):
//        y += dx * scale * sum(q * code) + (dx * sum(q)) * offset
//   Q8_0 (stored as code + 128, so unsigned): y += dx * scale * (sum(q * (code + 128)) - 128 * sum(q))
struct Q8Rows {  // quantized activation rows
  const int32_t* q;    // int8 quads as int32, [R, K / 4]
  const float* dx;     // [R, nb]
  const float* dsum;   // dx * sum(q) per block [R, nb]
  const int32_t* sum;  // sum(q) per block [R, nb]
  int64_t k4, nb;
};

// 16 block scales (or offsets) of one output group: float32, or float16 as GGUF stores them (exact widening)
inline __m512 lanes16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 lanes16(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

template <int R, int OG, bool Q41, typename S>
inline void q8a_tile(const Q8Rows& a, const uint8_t* codes, const S* scale, const S* offset, float* y,
                     int64_t N, int64_t g0) {
  constexpr int C = Q41 ? 4 : 8;  // 64-byte chunks per block and group
  const int64_t nb = a.nb;
  const __m512i low4 = _mm512_set1_epi8(0x0F);
  __m512 accf[OG][R];
  for (int j = 0; j < OG; ++j)
    for (int r = 0; r < R; ++r) accf[j][r] = _mm512_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i acci[OG][R];
    for (int j = 0; j < OG; ++j)
      for (int r = 0; r < R; ++r)
        acci[j][r] = Q41 ? _mm512_setzero_si512() : _mm512_set1_epi32(-128 * a.sum[r * nb + b]);
    for (int c = 0; c < C; ++c) {
      for (int j = 0; j < OG; ++j) {
        const __m512i v = _mm512_loadu_si512(codes + (((g0 + j) * nb + b) * C + c) * 64);
        if constexpr (Q41) {
          const __m512i lo = _mm512_and_si512(v, low4);
          const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), low4);
          for (int r = 0; r < R; ++r) {
            const int32_t* q = a.q + r * a.k4 + b * 8 + 2 * c;
            acci[j][r] = _mm512_dpbusd_epi32(acci[j][r], lo, _mm512_set1_epi32(q[0]));
            acci[j][r] = _mm512_dpbusd_epi32(acci[j][r], hi, _mm512_set1_epi32(q[1]));
          }
        } else {
          for (int r = 0; r < R; ++r)
            acci[j][r] = _mm512_dpbusd_epi32(acci[j][r], v, _mm512_set1_epi32(a.q[r * a.k4 + b * 8 + c]));
        }
      }
    }
    for (int j = 0; j < OG; ++j) {
      const int64_t sb = ((g0 + j) * nb + b) * 16;
      const __m512 sv = lanes16(scale + sb);
      for (int r = 0; r < R; ++r) {
        const __m512 f = _mm512_mul_ps(sv, _mm512_set1_ps(a.dx[r * nb + b]));
        accf[j][r] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acci[j][r]), f, accf[j][r]);
        if constexpr (Q41)
          accf[j][r] = _mm512_fmadd_ps(lanes16(offset + sb), _mm512_set1_ps(a.dsum[r * nb + b]), accf[j][r]);
      }
    }
  }
  for (int j = 0; j < OG; ++j) {
    const int64_t o = (g0 + j) * 16;
    if (o >= N) break;
    const __mmask16 m = o + 16 <= N ? static_cast<__mmask16>(0xFFFF) : static_cast<__mmask16>((1u << (N - o)) - 1u);
    for (int r = 0; r < R; ++r) _mm512_mask_storeu_ps(y + r * N + o, m, accf[j][r]);
  }
}

// x rows -> int8 blocks (round to nearest even: the default MXCSR mode, as numpy/jnp.round)
void quantize_rows(const float* x, int64_t R, int64_t K, int8_t* q, float* dx, float* dsum, int32_t* sum) {
  const int64_t nb = K / 32;
  for (int64_t r = 0; r < R; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      const float* xb = x + r * K + b * 32;
      const __m512 x0 = _mm512_loadu_ps(xb), x1 = _mm512_loadu_ps(xb + 16);
      const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(x0), _mm512_abs_ps(x1)));
      const float d = amax / 127.0f;
      const float id = d != 0.0f ? 1.0f / d : 0.0f;
      const __m512i q0 = _mm512_cvtps_epi32(_mm512_mul_ps(x0, _mm512_set1_ps(id)));
      const __m512i q1 = _mm512_cvtps_epi32(_mm512_mul_ps(x1, _mm512_set1_ps(id)));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + r * K + b * 32), _mm512_cvtepi32_epi8(q0));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(q + r * K + b * 32 + 16), _mm512_cvtepi32_epi8(q1));
      const int32_t s = _mm512_reduce_add_epi32(_mm512_add_epi32(q0, q1));
      dx[r * nb + b] = d;
      sum[r * nb + b] = s;
      dsum[r * nb + b] = d * static_cast<float>(s);
    }
}
#endif
#elif defined(__AVX2__) && defined(__FMA__)
// ---- AVX2: 8 lanes; codes widened and converted, then scaled
inline float hsum8(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
inline __m256 widen_u8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(v)); }
inline __m256 widen_i8(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }

template <int R, int OT, typename S>
inline void q41_tile(const float* x, int64_t K, const uint8_t* codes, const S* scale, const S* offset, float* y,
                     int64_t N, int64_t o) {
  const int64_t nb = K / 32;
  const __m128i mask = _mm_set1_epi8(15);
  __m256 acc[OT][R];
  for (int t = 0; t < OT; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    for (int t = 0; t < OT; ++t) {
      const int64_t ob = (o + t) * nb + b;
      const __m256 sv = _mm256_set1_ps(scalar(scale, ob)), mv = _mm256_set1_ps(scalar(offset, ob));
      const __m128i q = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + ob * 16));
      const __m128i lo = _mm_and_si128(q, mask), hi = _mm_and_si128(_mm_srli_epi16(q, 4), mask);
      __m256 w[4] = {widen_u8(lo), widen_u8(_mm_srli_si128(lo, 8)), widen_u8(hi), widen_u8(_mm_srli_si128(hi, 8))};
      for (int j = 0; j < 4; ++j) w[j] = _mm256_add_ps(_mm256_mul_ps(w[j], sv), mv);
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < 4; ++j)
          acc[t][r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * K + b * 32 + 8 * j), w[j], acc[t][r]);
    }
  }
  for (int t = 0; t < OT; ++t)
    for (int r = 0; r < R; ++r) y[r * N + o + t] = hsum8(acc[t][r]);
}

template <int R, int OT, typename S>
inline void q80_tile(const float* x, int64_t K, const int8_t* codes, const S* scale, float* y, int64_t N,
                     int64_t o) {
  const int64_t nb = K / 32;
  __m256 acc[OT][R];
  for (int t = 0; t < OT; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    for (int t = 0; t < OT; ++t) {
      const int64_t ob = (o + t) * nb + b;
      const __m256 sv = _mm256_set1_ps(scalar(scale, ob));
      const __m128i q0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + ob * 32));
      const __m128i q1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(codes + ob * 32 + 16));
      __m256 w[4] = {widen_i8(q0), widen_i8(_mm_srli_si128(q0, 8)), widen_i8(q1), widen_i8(_mm_srli_si128(q1, 8))};
      for (int j = 0; j < 4; ++j) w[j] = _mm256_mul_ps(w[j], sv);
      for (int r = 0; r < R; ++r)
        for (int j = 0; j < 4; ++j)
          acc[t][r] = _mm256_fmadd_ps(_mm256_loadu_ps(x + r * K + b * 32 + 8 * j), w[j], acc[t][r]);
    }
  }
  for (int t = 0; t < OT; ++t)
    for (int r = 0; r < R; ++r) y[r * N + o + t] = hsum8(acc[t][r]);
}
// ---- float32 weights (see the AVX-512 version); 16 ymm registers, so fewer outputs per pass
template <int R> constexpr int f32_outputs() { return R <= 2 ? 4 : (R <= 6 ? 2 : 1); }

template <int R, int OT>
inline void f32_tile(const float* x, int64_t K, const float* w, float* y, int64_t N, int64_t o) {
  __m256 acc[OT][R];
  for (int t = 0; t < OT; ++t)
    for (int r = 0; r < R; ++r) acc[t][r] = _mm256_setzero_ps();
  const float* wr = w + o * K;
  int64_t k = 0;
  for (; k + 8 <= K; k += 8) {
    __m256 wv[OT];
    for (int t = 0; t < OT; ++t) wv[t] = _mm256_loadu_ps(wr + t * K + k);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_loadu_ps(x + r * K + k);
      for (int t = 0; t < OT; ++t) acc[t][r] = _mm256_fmadd_ps(xv, wv[t], acc[t][r]);
    }
  }
  if (k < K) {
    const __m256i m = _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(K - k)),
                                         _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
    __m256 wv[OT];
    for (int t = 0; t < OT; ++t) wv[t] = _mm256_maskload_ps(wr + t * K + k, m);
    for (int r = 0; r < R; ++r) {
      const __m256 xv = _mm256_maskload_ps(x + r * K + k, m);
      for (int t = 0; t < OT; ++t) acc[t][r] = _mm256_fmadd_ps(xv, wv[t], acc[t][r]);
    }
  }
  for (int t = 0; t < OT; ++t)
    for (int r = 0; r < R; ++r) y[r * N + o + t] = hsum8(acc[t][r]);
}
constexpr const char* kIsa = "avx2";
#else
#error "jaxdec native kernels need AVX2+FMA or AVX-512"
#endif

// Outputs [o0, o1) for rows [0, R) (R <= 8): several outputs per pass when there are few rows.
template <int R, typename S>
void rows_q41(const float* x, int64_t K, const uint8_t* c, const S* s, const S* m, float* y, int64_t N, int64_t o0,
              int64_t o1) {
  constexpr int OT = R == 1 ? 4 : (R == 2 ? 2 : 1);
  int64_t o = o0;
  for (; o + OT <= o1; o += OT) q41_tile<R, OT, S>(x, K, c, s, m, y, N, o);
  for (; o < o1; ++o) q41_tile<R, 1, S>(x, K, c, s, m, y, N, o);
}

template <int R, typename S>
void rows_q80(const float* x, int64_t K, const int8_t* c, const S* s, float* y, int64_t N, int64_t o0,
              int64_t o1) {
  constexpr int OT = R == 1 ? 4 : (R == 2 ? 2 : 1);
  int64_t o = o0;
  for (; o + OT <= o1; o += OT) q80_tile<R, OT, S>(x, K, c, s, y, N, o);
  for (; o < o1; ++o) q80_tile<R, 1, S>(x, K, c, s, y, N, o);
}

template <int R>
void rows_f32(const float* x, int64_t K, const float* w, float* y, int64_t N, int64_t o0, int64_t o1) {
  constexpr int OT = f32_outputs<R>();
  int64_t o = o0;
  for (; o + OT <= o1; o += OT) f32_tile<R, OT>(x, K, w, y, N, o);
  for (; o < o1; ++o) f32_tile<R, 1>(x, K, w, y, N, o);
}

template <typename F>
void by_rows(int64_t nr, F f) {
  switch (nr) {
    case 1: f(std::integral_constant<int, 1>()); break;
    case 2: f(std::integral_constant<int, 2>()); break;
    case 3: f(std::integral_constant<int, 3>()); break;
    case 4: f(std::integral_constant<int, 4>()); break;
    case 5: f(std::integral_constant<int, 5>()); break;
    case 6: f(std::integral_constant<int, 6>()); break;
    case 7: f(std::integral_constant<int, 7>()); break;
    default: f(std::integral_constant<int, 8>()); break;
  }
}

// Work sharing on XLA's intra-op pool. Chunks are claimed from an atomic counter by the calling thread
// and by helper tasks alike, and the caller only waits for chunks already claimed by running threads,
// so it never depends on a queued task being started (no deadlock when the pool is busy).
struct Shared {
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> done{0};
};

template <typename F>
void parallel_for(ffi::ThreadPool& pool, int64_t max_threads, int64_t min_work, int64_t work, int64_t nchunks,
                  F fn) {
  int64_t threads = std::max<int64_t>(1, pool.num_threads());
  if (max_threads > 0) threads = std::min(threads, max_threads);
  if (work < min_work) threads = 1;  // small products: not worth waking a thread
  threads = std::min(threads, nchunks);
  if (threads <= 1) {
    for (int64_t i = 0; i < nchunks; ++i) fn(i);
    return;
  }
  auto shared = std::make_shared<Shared>();
  auto run = [shared, fn, nchunks]() {
    int64_t i;
    while ((i = shared->next.fetch_add(1)) < nchunks) {
      fn(i);
      shared->done.fetch_add(1);
    }
  };
  for (int64_t t = 1; t < threads; ++t) {
    auto task = run;
    pool.Schedule(std::move(task));
  }
  run();
  while (shared->done.load() < nchunks) std::this_thread::yield();
}

struct Dims {
  int64_t R, K, N, nb, layer;
};

ffi::ErrorOr<Dims> dims_of(const ffi::AnyBuffer& x, const ffi::AnyBuffer& scale, int64_t index,
                           int64_t y_count) {
  auto xd = x.dimensions();
  auto sd = scale.dimensions();
  if (xd.size() < 1 || sd.size() < 2) return ffi::Unexpected(ffi::Error::InvalidArgument("bad ranks"));
  Dims d;
  d.K = xd.back();
  d.N = sd[sd.size() - 2];
  d.nb = sd[sd.size() - 1];
  if (d.K != d.nb * 32) return ffi::Unexpected(ffi::Error::InvalidArgument("x and W inner sizes differ"));
  d.R = d.K ? x.element_count() / d.K : 0;
  int64_t layers = (d.N * d.nb) ? scale.element_count() / (d.N * d.nb) : 0;
  if (y_count != d.R * d.N) return ffi::Unexpected(ffi::Error::InvalidArgument("bad output size"));
  d.layer = std::min<int64_t>(std::max<int64_t>(index, 0), std::max<int64_t>(layers - 1, 0));
  return d;
}

constexpr int64_t kChunk = 64;  // output features per work item

template <typename S>
void q41_run(ffi::ThreadPool& pool, int64_t max_threads, int64_t min_work, const Dims& d, const float* xp, const uint8_t* codes,
             const S* scale, const S* offset, float* yp) {
  const int64_t per_layer = d.N * d.nb;
  const uint8_t* cp = codes + d.layer * per_layer * 16;
  const S* sp = scale + d.layer * per_layer;
  const S* mp = offset + d.layer * per_layer;
  const int64_t nchunks = (d.N + kChunk - 1) / kChunk;
  parallel_for(pool, max_threads, min_work, d.R * d.N * d.K, nchunks, [=](int64_t i) {
    const int64_t o0 = i * kChunk, o1 = std::min(d.N, o0 + kChunk);
    for (int64_t r0 = 0; r0 < d.R; r0 += 8) {
      by_rows(std::min<int64_t>(8, d.R - r0), [&](auto rc) {
        rows_q41<decltype(rc)::value, S>(xp + r0 * d.K, d.K, cp, sp, mp, yp + r0 * d.N, d.N, o0, o1);
      });
    }
  });
}

template <typename S>
void q80_run(ffi::ThreadPool& pool, int64_t max_threads, int64_t min_work, const Dims& d, const float* xp, const int8_t* codes,
             const S* scale, float* yp) {
  const int64_t per_layer = d.N * d.nb;
  const int8_t* cp = codes + d.layer * per_layer * 32;
  const S* sp = scale + d.layer * per_layer;
  const int64_t nchunks = (d.N + kChunk - 1) / kChunk;
  parallel_for(pool, max_threads, min_work, d.R * d.N * d.K, nchunks, [=](int64_t i) {
    const int64_t o0 = i * kChunk, o1 = std::min(d.N, o0 + kChunk);
    for (int64_t r0 = 0; r0 < d.R; r0 += 8) {
      by_rows(std::min<int64_t>(8, d.R - r0), [&](auto rc) {
        rows_q80<decltype(rc)::value, S>(xp + r0 * d.K, d.K, cp, sp, yp + r0 * d.N, d.N, o0, o1);
      });
    }
  });
}

ffi::Error Q41Impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer codes, ffi::AnyBuffer scale,
                   ffi::AnyBuffer offset, ffi::BufferR0<ffi::S32> index, ffi::Result<ffi::AnyBuffer> y,
                   int64_t max_threads, int64_t min_work) {
  auto d_or = dims_of(x, scale, index.typed_data()[0], y->element_count());
  if (d_or.has_error()) return d_or.error();
  if (offset.element_type() != scale.element_type())
    return ffi::Error::InvalidArgument("scale and offset dtypes differ");
  const float* xp = static_cast<const float*>(x.untyped_data());
  const uint8_t* cp = static_cast<const uint8_t*>(codes.untyped_data());
  float* yp = static_cast<float*>(y->untyped_data());
  if (scale.element_type() == ffi::DataType::F32) {
    q41_run(pool, max_threads, min_work, d_or.value(), xp, cp, static_cast<const float*>(scale.untyped_data()),
            static_cast<const float*>(offset.untyped_data()), yp);
  } else if (scale.element_type() == ffi::DataType::F16) {
    q41_run(pool, max_threads, min_work, d_or.value(), xp, cp, static_cast<const uint16_t*>(scale.untyped_data()),
            static_cast<const uint16_t*>(offset.untyped_data()), yp);
  } else {
    return ffi::Error::InvalidArgument("block scales must be float32 or float16");
  }
  return ffi::Error::Success();
}

ffi::Error Q80Impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer codes, ffi::AnyBuffer scale,
                   ffi::BufferR0<ffi::S32> index, ffi::Result<ffi::AnyBuffer> y, int64_t max_threads,
                   int64_t min_work) {
  auto d_or = dims_of(x, scale, index.typed_data()[0], y->element_count());
  if (d_or.has_error()) return d_or.error();
  const float* xp = static_cast<const float*>(x.untyped_data());
  const int8_t* cp = static_cast<const int8_t*>(codes.untyped_data());
  float* yp = static_cast<float*>(y->untyped_data());
  if (scale.element_type() == ffi::DataType::F32) {
    q80_run(pool, max_threads, min_work, d_or.value(), xp, cp, static_cast<const float*>(scale.untyped_data()), yp);
  } else if (scale.element_type() == ffi::DataType::F16) {
    q80_run(pool, max_threads, min_work, d_or.value(), xp, cp, static_cast<const uint16_t*>(scale.untyped_data()), yp);
  } else {
    return ffi::Error::InvalidArgument("block scales must be float32 or float16");
  }
  return ffi::Error::Success();
}

// float32 W: x [..., K], W [L, N, K] (or [N, K]); layer `index` (clamped) is read in place
ffi::Error F32Impl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer w, ffi::BufferR0<ffi::S32> index,
                   ffi::Result<ffi::AnyBuffer> y, int64_t max_threads, int64_t min_work) {
  if (x.element_type() != ffi::DataType::F32 || w.element_type() != ffi::DataType::F32 ||
      y->element_type() != ffi::DataType::F32)
    return ffi::Error::InvalidArgument("the float32 matmul needs float32 x, W and y");
  auto xd = x.dimensions();
  auto wd = w.dimensions();
  if (xd.size() < 1 || wd.size() < 2) return ffi::Error::InvalidArgument("bad ranks");
  const int64_t K = xd.back(), N = wd[wd.size() - 2];
  if (wd.back() != K) return ffi::Error::InvalidArgument("x and W inner sizes differ");
  const int64_t R = K ? x.element_count() / K : 0;
  if (y->element_count() != R * N) return ffi::Error::InvalidArgument("bad output size");
  float* yp = static_cast<float*>(y->untyped_data());
  if (K == 0) {
    std::fill(yp, yp + R * N, 0.0f);
    return ffi::Error::Success();
  }
  const int64_t layers = N ? w.element_count() / (N * K) : 0;
  const int64_t layer = std::min<int64_t>(std::max<int64_t>(index.typed_data()[0], 0),
                                          std::max<int64_t>(layers - 1, 0));
  const float* xp = static_cast<const float*>(x.untyped_data());
  const float* wp = static_cast<const float*>(w.untyped_data()) + layer * N * K;
  const int64_t nchunks = (N + kChunk - 1) / kChunk;
  parallel_for(pool, max_threads, min_work, R * N * K, nchunks, [=](int64_t i) {
    const int64_t o0 = i * kChunk, o1 = std::min(N, o0 + kChunk);
    for (int64_t r0 = 0; r0 < R; r0 += 8) {
      by_rows(std::min<int64_t>(8, R - r0), [&](auto rc) {
        rows_f32<decltype(rc)::value>(xp + r0 * K, K, wp, yp + r0 * N, N, o0, o1);
      });
    }
  });
  return ffi::Error::Success();
}

// int8-activation product against repacked weights: x [..., K]; codes [L?, G, nb, C, 64] uint8; scale and
// offset [L?, G, nb, 16] float32 (offset ignored for Q8_0); layer `index` (clamped) read in place; y [..., N]
ffi::Error Q8aImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::AnyBuffer codes, ffi::AnyBuffer scale,
                   ffi::AnyBuffer offset, ffi::BufferR0<ffi::S32> index, ffi::Result<ffi::AnyBuffer> y,
                   int64_t q41, int64_t max_threads, int64_t min_work) {
#if defined(JAXDEC_HAS_Q8A)
  const bool f16 = scale.element_type() == ffi::DataType::F16;
  if (x.element_type() != ffi::DataType::F32 || codes.element_type() != ffi::DataType::U8 ||
      (!f16 && scale.element_type() != ffi::DataType::F32) || offset.element_type() != scale.element_type())
    return ffi::Error::InvalidArgument("q8 activations: x float32, codes uint8, scale and offset both float32 or "
                                       "both float16 expected");
  auto xd = x.dimensions();
  auto sd = scale.dimensions();
  if (xd.size() < 1 || sd.size() < 3 || sd.back() != 16) return ffi::Error::InvalidArgument("bad ranks");
  const int64_t K = xd.back(), G = sd[sd.size() - 3], nb = sd[sd.size() - 2];
  if (K != nb * 32) return ffi::Error::InvalidArgument("x and W inner sizes differ");
  const int64_t R = K ? x.element_count() / K : 0;
  const int64_t N = R ? y->element_count() / R : 0;
  if (N > G * 16 || (R && y->element_count() != R * N)) return ffi::Error::InvalidArgument("bad output size");
  const int64_t C = q41 ? 4 : 8;
  const int64_t per_layer = G * nb * 16;
  const int64_t layers = per_layer ? scale.element_count() / per_layer : 0;
  if (codes.element_count() != layers * G * nb * C * 64) return ffi::Error::InvalidArgument("bad codes size");
  float* yp = static_cast<float*>(y->untyped_data());
  if (R == 0 || N == 0) return ffi::Error::Success();
  const int64_t layer = std::min<int64_t>(std::max<int64_t>(index.typed_data()[0], 0),
                                          std::max<int64_t>(layers - 1, 0));
  std::vector<int32_t> qbuf(R * K / 4), sums(R * nb);
  std::vector<float> dx(R * nb), dsum(R * nb);
  quantize_rows(static_cast<const float*>(x.untyped_data()), R, K, reinterpret_cast<int8_t*>(qbuf.data()),
                dx.data(), dsum.data(), sums.data());
  const uint8_t* cp = static_cast<const uint8_t*>(codes.untyped_data()) + layer * G * nb * C * 64;
  const int32_t* qp = qbuf.data();
  const float *dxp = dx.data(), *dsp = dsum.data();
  const int32_t* sump = sums.data();
  auto run = [&](auto* sp0, auto* mp0) {
    using S = std::remove_const_t<std::remove_pointer_t<decltype(sp0)>>;
    const S* sp = sp0 + layer * per_layer;
    const S* mp = mp0 + (q41 ? layer * per_layer : 0);
    constexpr int64_t kGroups = 4;  // 64 output features per work item
    const int64_t nchunks = (G + kGroups - 1) / kGroups;
    parallel_for(pool, max_threads, min_work, R * N * K / 4, nchunks, [=](int64_t i) {
      const int64_t g0 = i * kGroups, g1 = std::min(G, g0 + kGroups);
      for (int64_t r0 = 0; r0 < R; r0 += 8) {
        const Q8Rows a{qp + r0 * (K / 4), dxp + r0 * nb, dsp + r0 * nb, sump + r0 * nb, K / 4, nb};
        float* yr = yp + r0 * N;
        by_rows(std::min<int64_t>(8, R - r0), [&](auto rc) {
          constexpr int RR = decltype(rc)::value;
          constexpr int OG = RR <= 2 ? 4 : (RR <= 4 ? 2 : 1);
          int64_t g = g0;
          if (q41) {
            for (; g + OG <= g1; g += OG) q8a_tile<RR, OG, true, S>(a, cp, sp, mp, yr, N, g);
            for (; g < g1; ++g) q8a_tile<RR, 1, true, S>(a, cp, sp, mp, yr, N, g);
          } else {
            for (; g + OG <= g1; g += OG) q8a_tile<RR, OG, false, S>(a, cp, sp, mp, yr, N, g);
            for (; g < g1; ++g) q8a_tile<RR, 1, false, S>(a, cp, sp, mp, yr, N, g);
          }
        });
      }
    });
  };
  if (scale.element_type() == ffi::DataType::F32)
    run(static_cast<const float*>(scale.untyped_data()), static_cast<const float*>(offset.untyped_data()));
  else
    run(static_cast<const uint16_t*>(scale.untyped_data()), static_cast<const uint16_t*>(offset.untyped_data()));
  return ffi::Error::Success();
#else
  return ffi::Error::InvalidArgument("q8 activations need AVX512-VNNI, which this build lacks");
#endif
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxdecQ8aMatmul, Q8aImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::BufferR0<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("q41")
                                  .Attr<int64_t>("max_threads")
                                  .Attr<int64_t>("min_parallel_work"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxdecF32Matmul, F32Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::BufferR0<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("max_threads")
                                  .Attr<int64_t>("min_parallel_work"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxdecQ41Matmul, Q41Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::BufferR0<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("max_threads")
                                  .Attr<int64_t>("min_parallel_work"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(JaxdecQ80Matmul, Q80Impl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::AnyBuffer>()
                                  .Arg<ffi::BufferR0<ffi::S32>>()
                                  .Ret<ffi::AnyBuffer>()
                                  .Attr<int64_t>("max_threads")
                                  .Attr<int64_t>("min_parallel_work"));

extern "C" const char* JaxdecKernelIsa() { return kIsa; }

// 1 when this build has the int8-activation kernel (AVX512-VNNI), else 0
extern "C" int JaxdecKernelHasQ8a() {
#if defined(JAXDEC_HAS_Q8A)
  return 1;
#else
  return 0;
#endif
}
