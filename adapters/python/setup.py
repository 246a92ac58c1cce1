"""Builds the sapo_torch Python package: the pure-Python wrappers plus the compiled module
sapo_torch._C, which holds the torch.ops.sapo.* registrations of adapters/torch/register_ops.cpp.

Run it with the Python whose torch you will import (Debian: /usr/bin/python3 with
python3-torch). CMake (adapters/python/CMakeLists.txt) drives it so that nothing is written
into the source tree:

    /usr/bin/python3 setup.py build --build-base <build>/python-build --build-lib <build>/python

after which `PYTHONPATH=<build>/python python3 -c "import sapo_torch"` works. A developer
install (`pip install -e .`, `setup.py develop`) also works but writes into the source tree.

Environment variables, set by CMake so the extension is compiled like the rest of the build:
    SAPO_NO_SIMD=1        compile the kernels with one scalar lane (CMake SAPO_WITH_XSIMD=OFF)
    SAPO_EXTRA_CXXFLAGS   extra compiler flags, space-separated (e.g. "-march=native")
"""
import glob
import os
import platform

import torch
from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.normpath(os.path.join(HERE, "..", ".."))

# C++17 is what sapo needs; torch's BuildExtension would otherwise add -std=c++14.
cxx_flags = ["-std=c++17", "-O3", "-Wall", "-Wextra", "-Wno-unused-parameter",
             # torch's own headers use std::iterator (deprecated in C++17); they are not ours to fix.
             "-Wno-deprecated-declarations"]
defines = []
if os.environ.get("SAPO_NO_SIMD", "") not in ("", "0", "OFF", "off"):
    defines.append(("SAPO_NO_SIMD", None))
cxx_flags += os.environ.get("SAPO_EXTRA_CXXFLAGS", "").split()

# Runtime instruction-set dispatch (include/sapo/dispatch.hpp): src/isa_kernels.cpp once
# per instruction set, with that set's flags, plus src/dispatch.cpp, which picks one at run
# time. The same variants and flags as the CMake build (CMakeLists.txt, SAPO_DISPATCH_*);
# the objects are linked after the module's own, in ascending instruction-set order.
if defines or platform.machine().lower() not in ("x86_64", "amd64", "i686", "i386"):
    DISPATCH_VARIANTS = [("native", [])]
else:
    base = ["-march=x86-64", "-mtune=generic"]
    DISPATCH_VARIANTS = [
        ("sse2", base),
        ("avx2", base + ["-mavx2", "-mfma"]),
        ("avx512", base + ["-mavx2", "-mfma", "-mavx512f", "-mavx512bw", "-mavx512dq", "-mavx512vl", "-mavx512cd"]),
    ]
SRC = os.path.join(ROOT, "src")


class BuildWithDispatch(BuildExtension):
    """Compiles the dispatch objects with their own flags, then builds the extension."""

    def build_extensions(self):
        for ext in self.extensions:
            objects = []
            core_macros = list(ext.define_macros)
            if DISPATCH_VARIANTS[0][0] == "native":
                core_macros.append(("SAPO_DISPATCH_NATIVE_ONLY", None))
            jobs = [("core", os.path.join(SRC, "dispatch.cpp"), core_macros, [])]
            for name, flags in DISPATCH_VARIANTS:
                jobs.append((name, os.path.join(SRC, "isa_kernels.cpp"),
                             list(ext.define_macros) + [("SAPO_DISPATCH_VARIANT", name)], flags))
            for name, source, macros, flags in jobs:
                objects += self.compiler.compile(
                    [source], output_dir=os.path.join(self.build_temp, "dispatch-" + name), macros=macros,
                    include_dirs=ext.include_dirs + [SRC],
                    # The libstdc++ ABI torch was built with, as BuildExtension gives the module's own files.
                    extra_postargs=cxx_flags + ["-fPIC", "-D_GLIBCXX_USE_CXX11_ABI=%d" % int(torch._C._GLIBCXX_USE_CXX11_ABI)]
                    + flags,
                    depends=ext.depends)
            ext.extra_objects = objects + list(ext.extra_objects or [])
            ext.define_macros = list(ext.define_macros) + [("SAPO_USE_DISPATCH", None)]
        super().build_extensions()


ext = CppExtension(
    name="sapo_torch._C",
    sources=[
        # The one TORCH_LIBRARY(sapo) registration of the project, the same file that
        # libsapo_torch.so is built from.
        os.path.join(ROOT, "adapters", "torch", "register_ops.cpp"),
        os.path.join(HERE, "src", "module.cpp"),
    ],
    include_dirs=[os.path.join(ROOT, "include"), os.path.join(ROOT, "adapters", "torch")],
    # Headers: without them distutils would skip the build after a header-only change.
    depends=sorted(glob.glob(os.path.join(ROOT, "include", "sapo", "*.hpp"))
                   + glob.glob(os.path.join(ROOT, "src", "*"))
                   + glob.glob(os.path.join(ROOT, "adapters", "torch", "sapo", "*.hpp"))),
    define_macros=defines,
    extra_compile_args={"cxx": cxx_flags},
)

setup(
    name="sapo_torch",
    version="0.1.0",
    description="Step-aligned policy optimization (SAPO) losses for PyTorch",
    license="Apache-2.0",
    packages=["sapo_torch"],
    package_dir={"sapo_torch": os.path.join(HERE, "sapo_torch")},
    ext_modules=[ext],
    cmdclass={"build_ext": BuildWithDispatch},
    python_requires=">=3.8",
    zip_safe=False,
)
