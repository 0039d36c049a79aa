"""The ops the attention types are built from, over packed segments.

Each family has one entry point that the modules call. Today every op runs its eager
PyTorch version; the Triton kernels of ``canvas_engineering.kernels`` plug in here.
"""
