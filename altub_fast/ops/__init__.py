"""Fused ops: launchers and autograd (torch.library custom ops) around the Triton kernels.

One module per op (``coupling``). Importing this package imports neither Triton nor the kernels;
``altub_fast.functional`` imports the op modules lazily, and they import the kernels on first launch.
"""
