// Module-init stub of the compiled extension `e2kd_fast._C`.
//
// The sources next to this file (cpu/<stem>.cpp, cuda/<stem>.cu) define their own library of ops,
// `e2kd_cpp::` (schemas with TORCH_LIBRARY_FRAGMENT in the CPU file, kernels with
// TORCH_LIBRARY_IMPL for the CPU and CUDA keys), when this shared library is loaded. They do not
// register implementations of the Python `e2kd::` ops: those are defined in e2kd_fast/ops/<stem>.py
// with their fakes and autograd, and their "cpp" back ends call the `e2kd_cpp::` ops
// (e2kd_fast/ops/backends.py chooses the back end). This file only makes the library importable
// from Python. csrc/README.md describes the layering.
#include <Python.h>

static struct PyModuleDef e2kd_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "e2kd-fast compiled kernels (the e2kd_cpp:: ops, back ends of the e2kd:: ops)",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&e2kd_module); }
