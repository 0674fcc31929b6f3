// Module-init stub of the compiled extension `e2kd_fast._C`.
//
// The `e2kd::` op schemas are defined in Python (e2kd_fast/ops); C++ and CUDA kernels in this
// folder register themselves as implementations of those ops with TORCH_LIBRARY_IMPL when this
// library is loaded. This file only makes the shared library importable from Python.
#include <Python.h>

static struct PyModuleDef e2kd_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "e2kd-fast compiled kernels (implementations of the e2kd:: ops)",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&e2kd_module); }
