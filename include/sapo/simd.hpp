/// \file simd.hpp
/// \brief The lane type of the CPU kernels. With xsimd (Debian's libxsimd-dev, header only)
/// a lane pack is xsimd::batch<T> of the widest instruction set the compiler targets
/// (-march decides: SSE2 by default, AVX2/AVX-512 with -march=native); without it, or with
/// SAPO_NO_SIMD defined, a pack is one scalar. The per-token formulas in loss_math.hpp are
/// written once over these helpers and run on scalars, on packs and on a GPU alike.
#pragma once

#include <cmath>
#include <cstddef>

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

namespace sapo {
namespace simd {

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
#if defined(__AVX2__)
/// table[index] for 8 lanes at once, from a table of at most 8 floats (the memory holds 8
/// readable floats): it sits in one register and a lane permute (vpermps) looks it up.
inline pack<float> lookup8(const float* table, const xsimd::batch<int32_t>& index) {
  return _mm256_permutevar8x32_ps(_mm256_loadu_ps(table), index);
}
#endif
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
#endif

/// Name of the instruction set the packs use, for benchmark reports.
inline const char* instruction_set() {
#if SAPO_HAS_XSIMD
  return xsimd::default_arch::name();
#else
  return "scalar";
#endif
}

}  // namespace simd
}  // namespace sapo
