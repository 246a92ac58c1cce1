# Shared by scripts/test and scripts/demo: where the repository is, and an idempotent
# installer for Debian packages (only what is missing is installed).

SAPO_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

sapo_install_debs() {
  local missing=() pkg
  for pkg in "$@"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  local sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  echo "== installing Debian packages: ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}"
}

# What building the library, its tests and the examples needs.
SAPO_BUILD_DEBS=(g++ cmake ninja-build catch2 libeigen3-dev xtensor-dev xtl-dev libxsimd-dev)
# The LibTorch adapter and the benchmarks against libtorch. Debian's libtorch multiplies
# matrices through the system BLAS: without OpenBLAS it falls back to the reference BLAS,
# about 30x slower.
SAPO_TORCH_DEBS=(libtorch-dev libopenblas0-pthread libbenchmark-dev)
# The Python package sapo_torch (for Debian's /usr/bin/python3) and its pytest suite, and
# the c10d/gloo process groups of the distributed tests.
SAPO_PYTHON_DEBS=(python3-torch python3-pytest python3-setuptools python3-dev python3-numpy libgloo-dev)
# The MovieLens recommender (examples/recommender): its command line parser. The data
# conversion (scripts/fetch_movielens) installs R itself.
SAPO_REC_DEBS=(libcli11-dev)
