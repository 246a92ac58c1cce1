/// \file simd.hpp
/// \brief The lane type of the CPU kernels and the few lane operations that need an
/// instruction set's own instructions.
///
/// With xsimd (Debian's libxsimd-dev, header only) a lane pack is xsimd::batch<T> of the
/// widest instruction set the translation unit is compiled for (SSE2 by default on x86-64,
/// AVX2 or AVX-512 with -m flags or -march=native); without it, or with SAPO_NO_SIMD
/// defined, a pack is one scalar. The per-token formulas in loss_math.hpp are written once
/// over these helpers and run on scalars, on packs and on a GPU alike.
///
/// Everything whose machine code depends on the instruction set lives in an inline
/// namespace named after it (SAPO_ISA_NAMESPACE: isa_sse2, isa_avx2, isa_avx512, ...). A
/// program may hold the same kernel compiled for several instruction sets -- the runtime
/// dispatch of dispatch.hpp does, and so does a -march=native program that links the
/// dispatched libsapo_torch.so -- and each copy keeps a name of its own, so the linker never
/// merges an AVX-512 copy with an SSE2 one (which would be an ODR violation and, on a CPU
/// without AVX-512, an illegal instruction).
///
/// The instruction-set-specific operations (table lookups by lane permute or gather,
/// variable shifts, float-to-double widening) are chosen by the pack's xsimd architecture,
/// never by a predefined macro such as __AVX2__: that macro is also defined under AVX-512,
/// where the packs are 512 bits wide.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <type_traits>

#include "config.hpp"

#if !defined(SAPO_NO_SIMD) && !defined(__CUDACC__) && defined(__has_include)
#if __has_include(<xsimd/xsimd.hpp>)
#include <xsimd/xsimd.hpp>
#define SAPO_HAS_XSIMD 1
#endif
#endif
#ifndef SAPO_HAS_XSIMD
#define SAPO_HAS_XSIMD 0
#endif
#if SAPO_HAS_XSIMD && (defined(__x86_64__) || defined(__i386__))
#include <immintrin.h>
#endif

// The instruction set of this translation unit, as a namespace name and a string.
#if defined(__CUDACC__) || defined(__HIPCC__)
#define SAPO_ISA_NAMESPACE isa_device
#define SAPO_ISA_NAME "device"
#elif !SAPO_HAS_XSIMD
#define SAPO_ISA_NAMESPACE isa_scalar
#define SAPO_ISA_NAME "scalar"
#elif XSIMD_WITH_AVX512BW && XSIMD_WITH_AVX512DQ && defined(__AVX512VL__)
#define SAPO_ISA_NAMESPACE isa_avx512
#define SAPO_ISA_NAME "avx512"
#elif XSIMD_WITH_AVX512F
#define SAPO_ISA_NAMESPACE isa_avx512f
#define SAPO_ISA_NAME "avx512f"
#elif XSIMD_WITH_AVX2 && XSIMD_WITH_FMA3_AVX2
#define SAPO_ISA_NAMESPACE isa_avx2
#define SAPO_ISA_NAME "avx2"
#elif XSIMD_WITH_AVX2
#define SAPO_ISA_NAMESPACE isa_avx2_nofma
#define SAPO_ISA_NAME "avx2-nofma"
#elif XSIMD_WITH_AVX
#define SAPO_ISA_NAMESPACE isa_avx
#define SAPO_ISA_NAME "avx"
#elif XSIMD_WITH_SSE4_2 || XSIMD_WITH_SSE4_1 || XSIMD_WITH_SSSE3 || XSIMD_WITH_SSE3
#define SAPO_ISA_NAMESPACE isa_sse4
#define SAPO_ISA_NAME "sse4"
#elif XSIMD_WITH_SSE2
#define SAPO_ISA_NAMESPACE isa_sse2
#define SAPO_ISA_NAME "sse2"
#elif XSIMD_WITH_NEON64
#define SAPO_ISA_NAMESPACE isa_neon64
#define SAPO_ISA_NAME "neon64"
#else
#define SAPO_ISA_NAMESPACE isa_generic
#define SAPO_ISA_NAME "generic"
#endif

// Width of the integer lanes beside the float packs with the permutes, gathers and variable
// shifts the kernels use: 512 (AVX-512 F+BW+DQ+VL), 256 (AVX2), 0 (none: scalar loops).
#if SAPO_HAS_XSIMD && XSIMD_WITH_AVX512BW && XSIMD_WITH_AVX512DQ && defined(__AVX512VL__)
#define SAPO_SIMD_INT_LANES 512
#elif SAPO_HAS_XSIMD && XSIMD_WITH_AVX2 && !XSIMD_WITH_AVX512F
#define SAPO_SIMD_INT_LANES 256
#else
#define SAPO_SIMD_INT_LANES 0
#endif

namespace sapo {
namespace simd {
inline namespace SAPO_ISA_NAMESPACE {

// ---- scalars (host and device) ----
template <class T>
SAPO_HOST_DEVICE T select(bool c, T a, T b) {
  return c ? a : b;
}
template <class T>
SAPO_HOST_DEVICE T min(T a, T b) {
  return b < a ? b : a;
}
template <class T>
SAPO_HOST_DEVICE T max(T a, T b) {
  return a < b ? b : a;
}
SAPO_HOST_DEVICE float exp(float x) { return ::expf(x); }
SAPO_HOST_DEVICE double exp(double x) { return ::exp(x); }
SAPO_HOST_DEVICE bool all(bool x) { return x; }
SAPO_HOST_DEVICE double horizontal_sum(float x) { return x; }
SAPO_HOST_DEVICE double horizontal_sum(double x) { return x; }

#if SAPO_HAS_XSIMD
// ---- xsimd packs ----
template <class T, class A>
xsimd::batch<T, A> select(const xsimd::batch_bool<T, A>& c, const xsimd::batch<T, A>& a,
                          const xsimd::batch<T, A>& b) {
  return xsimd::select(c, a, b);
}
template <class T, class A>
xsimd::batch<T, A> min(const xsimd::batch<T, A>& a, const xsimd::batch<T, A>& b) {
  return xsimd::min(a, b);
}
template <class T, class A>
xsimd::batch<T, A> max(const xsimd::batch<T, A>& a, const xsimd::batch<T, A>& b) {
  return xsimd::max(a, b);
}
template <class T, class A>
xsimd::batch<T, A> exp(const xsimd::batch<T, A>& x) {
  return xsimd::exp(x);
}
template <class T, class A>
bool all(const xsimd::batch_bool<T, A>& x) {
  return xsimd::all(x);
}
template <class T, class A>
double horizontal_sum(const xsimd::batch<T, A>& x) {
  return static_cast<double>(xsimd::hadd(x));
}

template <class T>
using pack = xsimd::batch<T>;
template <class T>
pack<T> load(const T* p) {
  return pack<T>::load_unaligned(p);
}
template <class T>
void store(T* p, const pack<T>& v) {
  v.store_unaligned(p);
}
template <class T>
constexpr std::size_t lanes = pack<T>::size;

/// The architecture of the packs of this translation unit.
using arch = xsimd::default_arch;
constexpr bool arch_avx512 = std::is_base_of<xsimd::avx512bw, arch>::value && SAPO_SIMD_INT_LANES == 512;
constexpr bool arch_avx2 = std::is_base_of<xsimd::avx2, arch>::value && SAPO_SIMD_INT_LANES == 256;

/// Whether float packs have integer lanes beside them with variable shifts, lane permutes
/// and gathers (AVX2: 8 lanes, AVX-512: 16). Elsewhere the kernels use scalar loops for
/// table lookups and step bit sets.
template <class T>
constexpr bool vector_ints = std::is_same<T, float>::value && (arch_avx2 || arch_avx512);

/// Slots of a table that one register holds and a lane permute looks up (vpermps on AVX2,
/// vpermps zmm on AVX-512); 0 where there is no such permute.
template <class T>
constexpr int64_t register_table_slots = !vector_ints<T> ? 0 : (arch_avx512 ? 16 : 8);

using ipack = xsimd::batch<int32_t>;

/// The float lane mask as an int32 lane mask (vector_ints only).
inline xsimd::batch_bool<int32_t> int_mask(const xsimd::batch_bool<float>& m) {
#if SAPO_SIMD_INT_LANES == 512
  return xsimd::batch_bool<int32_t>(static_cast<typename xsimd::batch_bool<int32_t>::register_type>(m.data));
#elif SAPO_SIMD_INT_LANES == 256
  return xsimd::batch_bool<int32_t>(_mm256_castps_si256(m));
#else
  (void)m;
  return {};
#endif
}
/// The int32 lane mask as a float lane mask (vector_ints only).
inline xsimd::batch_bool<float> float_mask(const xsimd::batch_bool<int32_t>& m) {
#if SAPO_SIMD_INT_LANES == 512
  return xsimd::batch_bool<float>(static_cast<typename xsimd::batch_bool<float>::register_type>(m.data));
#elif SAPO_SIMD_INT_LANES == 256
  return xsimd::batch_bool<float>(_mm256_castsi256_ps(m));
#else
  (void)m;
  return {};
#endif
}

/// table[index] for every lane, from a table of at most register_table_slots<float> floats
/// (the memory holds that many readable floats): it sits in one register and one lane
/// permute looks it up.
inline pack<float> lookup_register(const float* table, const ipack& index) {
#if SAPO_SIMD_INT_LANES == 512
  return _mm512_permutexvar_ps(index, _mm512_loadu_ps(table));
#elif SAPO_SIMD_INT_LANES == 256
  return _mm256_permutevar8x32_ps(_mm256_loadu_ps(table), index);
#else
  (void)table, (void)index;
  return {};
#endif
}

/// table[index] for every lane by a hardware gather (any table size; vector_ints only).
inline pack<float> gather(const float* table, const ipack& index) {
#if SAPO_SIMD_INT_LANES == 512
  return _mm512_i32gather_ps(index, table, sizeof(float));
#elif SAPO_SIMD_INT_LANES == 256
  // The intrinsic itself: xsimd 8.1's batch::gather misses its AVX2 overload.
  return _mm256_i32gather_ps(table, index, sizeof(float));
#else
  (void)table, (void)index;
  return {};
#endif
}

/// m ? a : b per int32 lane (vector_ints only). The intrinsics themselves: xsimd 8.1's
/// AVX-512 select of int lanes does not compile without optimization (-O0 turns the
/// intrinsic it uses into a macro whose cast skips the batch's conversion).
inline ipack select_int(const xsimd::batch_bool<int32_t>& m, const ipack& a, const ipack& b) {
#if SAPO_SIMD_INT_LANES == 512
  return _mm512_mask_blend_epi32(m, b, a);
#elif SAPO_SIMD_INT_LANES == 256
  return _mm256_blendv_epi8(b, a, m);
#else
  return xsimd::select(m, a, b);
#endif
}

/// x << n per lane; 0 where n is outside [0, 32) (vpsllvd's rule, which the step bit sets
/// rely on: id -1 and ids >= 32 set no bit of the low word).
inline ipack shift_left(const ipack& x, const ipack& n) {
#if SAPO_SIMD_INT_LANES == 512
  return _mm512_sllv_epi32(x, n);
#elif SAPO_SIMD_INT_LANES == 256
  return _mm256_sllv_epi32(x, n);
#else
  (void)n;
  return x;
#endif
}
#else
template <class T>
using pack = T;
template <class T>
T load(const T* p) {
  return *p;
}
template <class T>
void store(T* p, T v) {
  *p = v;
}
template <class T>
constexpr std::size_t lanes = 1;
template <class T>
constexpr bool vector_ints = false;
template <class T>
constexpr int64_t register_table_slots = 0;
using ipack = int32_t;
#endif

/// A sum in double of packs of T: every lane is converted to double as it is added (SPEC §7:
/// reductions accumulate in double). Float packs of W lanes feed two double packs of W / 2.
template <class T>
struct double_sum {
#if SAPO_HAS_XSIMD
  using D = xsimd::batch<double>;
  static constexpr bool split = std::is_same<T, float>::value;  // float: two halves
  D lo = D(0.0), hi = D(0.0);

  void add(const pack<T>& x) {
    if constexpr (!split) {
      lo = lo + x;
    } else {
#if XSIMD_WITH_AVX512F
      const __m512 v = x;
      lo = lo + D(_mm512_cvtps_pd(_mm512_castps512_ps256(v)));
      hi = hi + D(_mm512_cvtps_pd(_mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(v), 1))));
#elif XSIMD_WITH_AVX
      const __m256 v = x;
      lo = lo + D(_mm256_cvtps_pd(_mm256_castps256_ps128(v)));
      hi = hi + D(_mm256_cvtps_pd(_mm256_extractf128_ps(v, 1)));
#elif XSIMD_WITH_SSE2
      const __m128 v = x;
      lo = lo + D(_mm_cvtps_pd(v));
      hi = hi + D(_mm_cvtps_pd(_mm_movehl_ps(v, v)));
#else
      alignas(64) float f[lanes<float>];
      alignas(64) double d[lanes<float>];
      x.store_aligned(f);
      for (std::size_t k = 0; k < lanes<float>; ++k) d[k] = f[k];
      lo = lo + D::load_aligned(d);
      hi = hi + D::load_aligned(d + D::size);
#endif
    }
  }
  double total() const { return split ? xsimd::hadd(lo) + xsimd::hadd(hi) : xsimd::hadd(lo); }
#else
  double s = 0;
  void add(T x) { s += static_cast<double>(x); }
  double total() const { return s; }
#endif
};

/// Name of the instruction set the packs use, for benchmark reports.
inline const char* instruction_set() { return SAPO_ISA_NAME; }

}  // namespace SAPO_ISA_NAMESPACE
}  // namespace simd
}  // namespace sapo
