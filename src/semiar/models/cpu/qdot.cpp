// Integer dot products of a GGUF's quantized weights with int8 activations (AVX512-VNNI).
//
// The activations of a row are quantised per block (32 or 256 values along K, one fp32 scale
// each); every weight format below keeps unsigned integer codes, so one vpdpbusd (u8 x s8 -> s32)
// multiplies 64 weights, and the formats' scales are applied per group as integers (k4, k6) or as
// fp32 (b8). A row's result depends only on that row, never on how many rows are multiplied with
// it (the loops run the same order for every row): the property that keeps speculative decoding
// on this path identical to one-token decoding on it.
//
// Formats (one weight row, K along it):
//   k4  Q4_K exactly: per superblock of 256, 128 bytes of 4-bit codes u (byte i of each half holds
//       weights 128h+i in its low nibble, 128h+64+i in its high nibble), 8 scales and 8 mins (u8, the
//       6-bit ones of the file), fp16 d and dmin:  w = d*sc[g]*u - dmin*m[g]  (g: group of 32)
//   k6  Q6_K exactly: per superblock, 256 codes q in 0..63 (a byte each), 16 int8 scales, fp16 d:
//       w = d*sc[j]*(q - 32)  (j: sub-block of 16)
//   b8  per group of 32, codes u in 0..255 and an fp16 scale: w = s*(u - 128)  (Q8_0, Q5_0, Q4_0 exactly,
//       anything else re-quantised to 8 bits)
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <immintrin.h>
#include <cmath>
#include <cstdint>

namespace {

inline float hsum(__m512 v) { return _mm512_reduce_add_ps(v); }

// x [M, K] fp32 -> xq int8 [M, K], dx fp32 [M, K/32] (the block's scale, repeated per group of 32),
// xs16 int16 [M, K/16] and xs32 int16 [M, K/32] (sums of xq), X fp32 [M, K/32] (dx * xs32)
std::vector<torch::Tensor> quantize_act(torch::Tensor x, int64_t block) {
  TORCH_CHECK(x.dtype() == torch::kFloat32 && x.dim() == 2 && x.is_contiguous(), "x: contiguous fp32 [M, K]");
  const int64_t M = x.size(0), K = x.size(1);
  TORCH_CHECK(K % block == 0 && block % 32 == 0, "K must be a multiple of the block");
  auto xq = torch::empty({M, K}, torch::kInt8);
  auto dx = torch::empty({M, K / 32}, torch::kFloat32);
  auto xs16 = torch::empty({M, K / 16}, torch::kInt16);
  auto xs32 = torch::empty({M, K / 32}, torch::kInt16);
  auto X = torch::empty({M, K / 32}, torch::kFloat32);
  const float* xp = x.data_ptr<float>();
  int8_t* q = xq.data_ptr<int8_t>();
  float* d = dx.data_ptr<float>();
  int16_t* s16 = xs16.data_ptr<int16_t>();
  int16_t* s32 = xs32.data_ptr<int16_t>();
  float* Xp = X.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t b = 0; b < K; b += block) {
      const float* src = xp + m * K + b;
      __m512 amax = _mm512_setzero_ps();
      for (int64_t i = 0; i < block; i += 16) amax = _mm512_max_ps(amax, _mm512_abs_ps(_mm512_loadu_ps(src + i)));
      const float a = _mm512_reduce_max_ps(amax);
      const float scale = a / 127.0f;
      const __m512 inv = _mm512_set1_ps(a > 0 ? 127.0f / a : 0.0f);
      for (int64_t i = 0; i < block; i += 16) {
        __m512i v = _mm512_cvtps_epi32(_mm512_roundscale_ps(_mm512_mul_ps(_mm512_loadu_ps(src + i), inv),
                                                            _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(q + m * K + b + i), _mm512_cvtsepi32_epi8(v));
        const int16_t s = static_cast<int16_t>(_mm512_reduce_add_epi32(v));
        s16[m * (K / 16) + (b + i) / 16] = s;
      }
      for (int64_t g = b / 32; g < (b + block) / 32; ++g) {
        d[m * (K / 32) + g] = scale;
        const int16_t s = s16[m * (K / 16) + 2 * g] + s16[m * (K / 16) + 2 * g + 1];
        s32[m * (K / 32) + g] = s;
        Xp[m * (K / 32) + g] = scale * s;
      }
    }
  }
  return {xq, dx, xs16, xs32, X};
}

inline float fp16(uint16_t h) { return _cvtsh_ss(h); }

// one weight row of k4 against one activation row
inline float dot_k4(const uint8_t* codes, const uint8_t* scm, const uint16_t* dd, const int8_t* xq,
                    const float* dx, const int16_t* xs32, int64_t K) {
  __m512 acc = _mm512_setzero_ps();
  __m128 accm = _mm_setzero_ps();
  const __m512i low = _mm512_set1_epi8(0x0f);
  // lanes 0-7 take the first group's scale, 8-15 the second's, for the four 64-weight quarters
  const __m512i i0 = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i i1 = _mm512_add_epi32(i0, _mm512_set1_epi32(2));
  const __m512i i2 = _mm512_add_epi32(i0, _mm512_set1_epi32(4));
  const __m512i i3 = _mm512_add_epi32(i0, _mm512_set1_epi32(6));
  for (int64_t sb = 0; sb < K / 256; ++sb) {
    const uint8_t* c = codes + sb * 128;
    const int8_t* x = xq + sb * 256;
    const __m512i sc = _mm512_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(scm + sb * 16)));
    const __m512i w0 = _mm512_loadu_si512(c), w1 = _mm512_loadu_si512(c + 64);
    __m512i p0 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(w0, low), _mm512_loadu_si512(x));
    __m512i p1 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(_mm512_srli_epi16(w0, 4), low),
                                     _mm512_loadu_si512(x + 64));
    __m512i p2 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(w1, low), _mm512_loadu_si512(x + 128));
    __m512i p3 = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(_mm512_srli_epi16(w1, 4), low),
                                     _mm512_loadu_si512(x + 192));
    __m512i s = _mm512_mullo_epi32(p0, _mm512_permutexvar_epi32(i0, sc));
    s = _mm512_add_epi32(s, _mm512_mullo_epi32(p1, _mm512_permutexvar_epi32(i1, sc)));
    s = _mm512_add_epi32(s, _mm512_mullo_epi32(p2, _mm512_permutexvar_epi32(i2, sc)));
    s = _mm512_add_epi32(s, _mm512_mullo_epi32(p3, _mm512_permutexvar_epi32(i3, sc)));
    const float xd = dx[sb * 8];
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(xd * fp16(dd[sb * 2])), acc);
    // mins: sum_g m[g] * xs32[g], 8 int16 products paired into 4 int32
    const __m128i mm = _mm_cvtepu8_epi16(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(scm + sb * 16 + 8)));
    const __m128i mx = _mm_madd_epi16(mm, _mm_loadu_si128(reinterpret_cast<const __m128i*>(xs32 + sb * 8)));
    accm = _mm_fmadd_ps(_mm_cvtepi32_ps(mx), _mm_set1_ps(xd * fp16(dd[sb * 2 + 1])), accm);
  }
  __m128 t = _mm_hadd_ps(accm, accm);
  t = _mm_hadd_ps(t, t);
  return hsum(acc) - _mm_cvtss_f32(t);
}

inline float dot_k6(const uint8_t* codes, const int8_t* sc8, const uint16_t* d, const int8_t* xq,
                    const float* dx, const int16_t* xs16, int64_t K) {
  __m512 acc = _mm512_setzero_ps();
  __m256 accc = _mm256_setzero_ps();
  // lane l of a 64-weight quarter belongs to sub-block 4r + l/4
  const __m512i base = _mm512_set_epi32(3, 3, 3, 3, 2, 2, 2, 2, 1, 1, 1, 1, 0, 0, 0, 0);
  for (int64_t sb = 0; sb < K / 256; ++sb) {
    const uint8_t* c = codes + sb * 256;
    const int8_t* x = xq + sb * 256;
    const __m128i sc8v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(sc8 + sb * 16));
    const __m512i sc = _mm512_cvtepi8_epi32(sc8v);
    __m512i s = _mm512_setzero_si512();
    for (int r = 0; r < 4; ++r) {
      __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(c + 64 * r), _mm512_loadu_si512(x + 64 * r));
      s = _mm512_add_epi32(s, _mm512_mullo_epi32(p, _mm512_permutexvar_epi32(_mm512_add_epi32(base, _mm512_set1_epi32(4 * r)), sc)));
    }
    const float xd = dx[sb * 8] * fp16(d[sb]);
    acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), _mm512_set1_ps(xd), acc);
    // the codes' offset of 32: sum_j sc[j] * xs16[j]
    const __m256i cx = _mm256_madd_epi16(_mm256_cvtepi8_epi16(sc8v),
                                         _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xs16 + sb * 16)));
    accc = _mm256_fmadd_ps(_mm256_cvtepi32_ps(cx), _mm256_set1_ps(32.0f * xd), accc);
  }
  __m128 t = _mm_add_ps(_mm256_castps256_ps128(accc), _mm256_extractf128_ps(accc, 1));
  t = _mm_hadd_ps(t, t);
  t = _mm_hadd_ps(t, t);
  return hsum(acc) - _mm_cvtss_f32(t);
}

inline float dot_b8(const uint8_t* codes, const uint16_t* s16, const int8_t* xq, const float* dx,
                    const float* X, int64_t K) {
  __m512 acc = _mm512_setzero_ps();
  __m512 accc = _mm512_setzero_ps();
  const __m512i lo = _mm512_set_epi32(1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0);
  const int64_t G = K / 32;
  int64_t g = 0;
  for (; g + 16 <= G; g += 16) {  // 512 weights: 16 groups, their scales at once
    const __m512 s = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(s16 + g)));
    const __m512 t = _mm512_mul_ps(s, _mm512_loadu_ps(dx + g));
    accc = _mm512_fmadd_ps(s, _mm512_loadu_ps(X + g), accc);
    for (int r = 0; r < 8; ++r) {
      __m512i p = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_loadu_si512(codes + (g + 2 * r) * 32),
                                      _mm512_loadu_si512(xq + (g + 2 * r) * 32));
      acc = _mm512_fmadd_ps(_mm512_cvtepi32_ps(p),
                            _mm512_permutexvar_ps(_mm512_add_epi32(lo, _mm512_set1_epi32(2 * r)), t), acc);
    }
  }
  float tail = 0.0f;
  for (; g < G; ++g) {  // the last groups one at a time (K not a multiple of 512)
    const float s = fp16(s16[g]);
    int32_t isum = 0;
    for (int i = 0; i < 32; ++i) isum += static_cast<int32_t>(codes[g * 32 + i]) * xq[g * 32 + i];
    tail += s * dx[g] * isum - 128.0f * s * X[g];
  }
  return hsum(acc) - 128.0f * hsum(accc) + tail;
}

// rows read ahead of the one being multiplied: the hardware prefetcher alone left the products
// at about half the memory bandwidth on a 2-core machine
constexpr int64_t kAhead = 2;
inline void prefetch_row(const uint8_t* p, int64_t bytes) {
  for (int64_t i = 0; i < bytes; i += 64) _mm_prefetch(reinterpret_cast<const char*>(p + i), _MM_HINT_T0);
}

void check(const torch::Tensor& t, c10::ScalarType dt, const char* name) {
  TORCH_CHECK(t.scalar_type() == dt && t.is_contiguous(), name, ": wrong dtype or not contiguous");
}

// out [M, Nout] fp32: columns col..col+N get x @ w.T for a weight of N rows
void mm_k4(torch::Tensor out, int64_t col, torch::Tensor xq, torch::Tensor dx, torch::Tensor xs32,
           torch::Tensor codes, torch::Tensor scm, torch::Tensor dd, int64_t grain) {
  check(xq, torch::kInt8, "xq"); check(codes, torch::kUInt8, "codes"); check(scm, torch::kUInt8, "scm");
  const int64_t M = xq.size(0), K = xq.size(1), N = codes.size(0), NO = out.size(1);
  TORCH_CHECK(codes.size(1) == K / 2 && K % 256 == 0, "k4: shapes");
  float* o = out.data_ptr<float>();
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const uint8_t* s = scm.data_ptr<uint8_t>();
  const uint16_t* d = reinterpret_cast<const uint16_t*>(dd.data_ptr<at::Half>());
  const int8_t* x = xq.data_ptr<int8_t>();
  const float* dxp = dx.data_ptr<float>();
  const int16_t* xs = xs32.data_ptr<int16_t>();
  at::parallel_for(0, N, grain, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n) {
      prefetch_row(c + (n + kAhead) * (K / 2), n + kAhead < b ? K / 2 : 0);
      for (int64_t m = 0; m < M; ++m)
        o[m * NO + col + n] = dot_k4(c + n * (K / 2), s + n * (K / 16), d + n * (K / 128), x + m * K,
                                     dxp + m * (K / 32), xs + m * (K / 32), K);
    }
  });
}

void mm_k6(torch::Tensor out, int64_t col, torch::Tensor xq, torch::Tensor dx, torch::Tensor xs16,
           torch::Tensor codes, torch::Tensor sc, torch::Tensor d, int64_t grain) {
  check(xq, torch::kInt8, "xq"); check(codes, torch::kUInt8, "codes"); check(sc, torch::kInt8, "sc");
  const int64_t M = xq.size(0), K = xq.size(1), N = codes.size(0), NO = out.size(1);
  TORCH_CHECK(codes.size(1) == K && K % 256 == 0, "k6: shapes");
  float* o = out.data_ptr<float>();
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const int8_t* s = sc.data_ptr<int8_t>();
  const uint16_t* dp = reinterpret_cast<const uint16_t*>(d.data_ptr<at::Half>());
  const int8_t* x = xq.data_ptr<int8_t>();
  const float* dxp = dx.data_ptr<float>();
  const int16_t* xs = xs16.data_ptr<int16_t>();
  at::parallel_for(0, N, grain, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n) {
      prefetch_row(c + (n + kAhead) * K, n + kAhead < b ? K : 0);
      for (int64_t m = 0; m < M; ++m)
        o[m * NO + col + n] = dot_k6(c + n * K, s + n * (K / 16), dp + n * (K / 256), x + m * K,
                                     dxp + m * (K / 32), xs + m * (K / 16), K);
    }
  });
}

void mm_b8(torch::Tensor out, int64_t col, torch::Tensor xq, torch::Tensor dx, torch::Tensor X,
           torch::Tensor codes, torch::Tensor s, int64_t grain) {
  check(xq, torch::kInt8, "xq"); check(codes, torch::kUInt8, "codes");
  const int64_t M = xq.size(0), K = xq.size(1), N = codes.size(0), NO = out.size(1);
  TORCH_CHECK(codes.size(1) == K && K % 32 == 0, "b8: shapes");
  float* o = out.data_ptr<float>();
  const uint8_t* c = codes.data_ptr<uint8_t>();
  const uint16_t* sp = reinterpret_cast<const uint16_t*>(s.data_ptr<at::Half>());
  const int8_t* x = xq.data_ptr<int8_t>();
  const float* dxp = dx.data_ptr<float>();
  const float* Xp = X.data_ptr<float>();
  at::parallel_for(0, N, grain, [&](int64_t a, int64_t b) {
    for (int64_t n = a; n < b; ++n) {
      prefetch_row(c + (n + kAhead) * K, n + kAhead < b ? K : 0);
      for (int64_t m = 0; m < M; ++m)
        o[m * NO + col + n] = dot_b8(c + n * K, sp + n * (K / 32), x + m * K, dxp + m * (K / 32),
                                     Xp + m * (K / 32), K);
    }
  });
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("quantize_act", &quantize_act);
  m.def("mm_k4", &mm_k4);
  m.def("mm_k6", &mm_k6);
  m.def("mm_b8", &mm_b8);
}
