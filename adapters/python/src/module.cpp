// The Python extension module sapo_torch._C.
//
// The operators themselves (schemas, CPU kernels, the autograd policy_loss) are registered by
// adapters/torch/register_ops.cpp, which setup.py compiles into this same shared object: its
// static initializers run when Python imports the module, and from then on the ops are
// reachable as torch.ops.sapo.*, which is what sapo_torch/__init__.py calls. So this file
// only has to give Python a module to import; it deliberately defines no functions of its
// own, so that the Python package and the C++ library run exactly the same kernels through
// the same dispatcher path.
//
// Plain CPython API instead of pybind11 / <torch/extension.h>: nothing here needs them, and
// leaving them out saves most of the compile time of the extension.
#include <Python.h>

namespace {

PyModuleDef sapo_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "sapo operator registrations (torch.ops.sapo.*); use the sapo_torch package, not this module.",
    -1,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
    nullptr,
};

}  // namespace

PyMODINIT_FUNC PyInit__C() { return PyModule_Create(&sapo_module); }
