#!/usr/bin/env bash
# Every function of a compiled artefact that touches a 256- or 512-bit register (ymm, zmm,
# AVX-512 mask registers) must belong to a per-instruction-set namespace (isa_avx2,
# isa_avx512: include/sapo/simd.hpp). Anything else -- a std:: template or a sapo helper that
# an AVX2 or AVX-512 object compiled and the linker kept -- would run wide instructions on a
# CPU that dispatch sent to a narrower variant, and die there with an illegal instruction.
#   tests/check_isa_symbols.sh FILE...
set -euo pipefail
status=0
for f in "$@"; do
  wide="$(objdump -d --no-show-raw-insn -C "$f" |
    awk '/^[0-9a-f]+ <.*>:$/ { fn = $0; next } /ymm|zmm|%k[0-7]/ { if (!(fn in seen)) { seen[fn] = 1; print fn } }')"
  total="$(printf '%s\n' "$wide" | grep -c . || true)"
  # xsimd's own templates carry the architecture in their names (xsimd::avx2, ...): distinct too.
  leaks="$(printf '%s\n' "$wide" | grep . | grep -v 'isa_avx2\|isa_avx512\|xsimd::avx\|xsimd::fma3<xsimd::avx' || true)"
  if [ -n "$leaks" ]; then
    echo "FAIL $f: functions outside the isa_avx2 / isa_avx512 namespaces use wide registers:"
    printf '%s\n' "$leaks" | head -20
    status=1
  elif [ "$total" -eq 0 ]; then
    echo "FAIL $f: no function uses wide registers (are the AVX2 / AVX-512 kernels linked in?)"
    status=1
  else
    echo "ok   $f: $total functions use ymm/zmm, all in isa_avx2 / isa_avx512"
  fi
done
exit $status
