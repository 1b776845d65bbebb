"""Triton kernels, one op per module, each with a plain-torch reference that is also the CPU path.

Lives in the repository's top-level ``kernels/`` folder and installs under the import name
``dit_kernels`` (``kernels`` on PyPI is an unrelated package). Never imports ``dit_engine``.
"""
