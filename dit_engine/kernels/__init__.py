"""Triton kernels, one op per module, each with a plain-torch reference that is also the CPU path.

Import name ``dit_engine.kernels`` (not a top-level ``kernels``, which is an unrelated PyPI package).
"""
