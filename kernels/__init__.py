"""Triton kernels and their launchers, imported as ``canvas_engineering.kernels``.

This package holds ``@triton.jit`` kernels and launchers only: no modules, no autograd,
no dispatch policy, and no imports from ``canvas_engineering``.
"""
