// The Python module revdeq_kernels._C. Importing it registers the kernels of csrc/cpu/ and
// csrc/cuda/bindings/ per dispatch key (TORCH_LIBRARY_IMPL) for the revdeq ops, whose schemas and fake
// kernels revdeq_kernels/ops/library.py defines (it is imported first).
//
// The module itself needs one function, so it uses the CPython API directly: <torch/extension.h>
// (pybind11 and all of torch's Python bindings) made this file a 30 s compile, the longest of the
// build, for a module with nothing to bind.
#include <Python.h>

namespace {

PyObject* built_with_cuda(PyObject*, PyObject*) {
#ifdef REVDEQ_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

PyMethodDef methods[] = {
    {"built_with_cuda", built_with_cuda, METH_NOARGS, "True when the CUDA kernels were compiled in"},
    {nullptr, nullptr, 0, nullptr},
};

PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "revdeq_kernels compiled ops; importing this module registers torch.ops.revdeq.*",
    -1,
    methods,
};

}  // namespace

#define REVDEQ_CONCAT_(a, b) a##b
#define REVDEQ_CONCAT(a, b) REVDEQ_CONCAT_(a, b)

// TORCH_EXTENSION_NAME is _C (setup.py's extension name), so this defines PyInit__C.
PyMODINIT_FUNC REVDEQ_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) { return PyModule_Create(&module); }
