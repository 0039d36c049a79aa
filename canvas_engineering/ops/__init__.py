"""The ops the attention types are built from, over packed segments.

Each family has one entry point that the modules call; it runs the Triton kernels of
``canvas_engineering.kernels`` where :func:`canvas_engineering.ops.backend.use_triton` says
so, else its eager PyTorch version.
"""
