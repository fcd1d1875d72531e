"""Triton kernels (installed as ``altub_fast.kernels``): ``@triton.jit`` functions only, no autograd,
no nn.Module. ``math`` holds the in-kernel special functions (written without libdevice so that
Triton's interpreter runs them), ``coupling`` the AllInOneBlock kernels.

Importing a kernel module imports Triton and decides, from ``TRITON_INTERPRET`` at that moment,
whether the kernels are compiled or interpreted; ``altub_fast.ops`` imports them lazily.
"""
