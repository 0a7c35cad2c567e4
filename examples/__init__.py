"""The demo (`python -m examples.demo`, the README's `make demo`) and what it and the benchmarks
need beside the library: model builders at real VLM geometry and the DINOv2-S ONNX conversion
(examples/models), the PNG drawing (visualize.py) and time / peak-memory measurement (profiling.py).
None of it is part of the `visionzip_kernels` package a user installs.
"""
