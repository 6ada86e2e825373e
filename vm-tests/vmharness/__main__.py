"""python -m vmharness (from vm-tests/): which kernel each series would boot."""

from .kernels import cached_path, find_kernel, selected_series

for s in selected_series():
    print(s, find_kernel(s) or f"not found: would build into {cached_path(s)}")
