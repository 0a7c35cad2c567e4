// An empty Python module so that `import visionzip_kernels._C` loads the shared library, which runs
// its static TORCH_LIBRARY registrations. Only setup.py compiles this file; the CMake build is a plain
// libtorch library for torch.ops.load_library and needs no Python.
#include <Python.h>

extern "C" PyObject* PyInit__C(void) {
  static PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
