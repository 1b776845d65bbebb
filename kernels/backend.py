"""Which implementation of an op runs, and how a Triton kernel is launched on a given device.

``DIT_KERNELS`` (read at every call, so tests and users may flip it at any time):

- ``auto`` (default): Triton kernels for CUDA tensors, the plain-torch references for CPU tensors;
- ``triton``: Triton everywhere; CPU tensors run in Triton's interpreter (slow: tests, small shapes);
- ``torch``: the plain-torch references everywhere.

A ``backend=`` argument on a public op overrides the variable for that call.

Why the interpreter is chosen here, at launch, and not with ``TRITON_INTERPRET=1``: Triton reads that
variable when ``@triton.jit`` decorates a function, i.e. when a kernel module is first imported. Any
earlier import (the model imports the kernels) would freeze the choice, so a test could not rely on
setting the variable first. :func:`on_device` instead hands CPU tensors to an interpreted twin of the
same kernel, whatever the import order; under ``TRITON_INTERPRET=1`` the kernels are already
interpreted and are used as they are.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton.language as tl
from torch import Tensor
from triton.runtime import interpreter
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

BACKENDS = ("auto", "triton", "torch")
ENV_BACKEND = "DIT_KERNELS"
# Debug aid: fill every output a launcher allocates with NaN, so an element a kernel forgot to
# write shows up as NaN instead of stale memory that happens to look right.
ENV_POISON = "DIT_KERNELS_POISON"

_twins: dict[JITFunction, object] = {}


def use_triton(*tensors: Tensor, backend: str | None = None) -> bool:
    """True when this call should take the Triton path (see the module docstring)."""
    mode = backend if backend is not None else os.environ.get(ENV_BACKEND, "auto")
    if mode not in BACKENDS:
        source = "backend argument" if backend is not None else f"environment variable {ENV_BACKEND}"
        raise ValueError(f"dit_kernels: {source} is {mode!r}, expected one of {BACKENDS}")
    if mode == "torch":
        return False
    if mode == "triton":
        return True
    return all(t.is_cuda for t in tensors)


def device_guard(tensor: Tensor):
    """Context for launching a kernel on ``tensor``'s data: its CUDA device made the current one.

    Triton launches on the current CUDA device (and its current stream), not on the device of the
    pointers it is given, so a launcher for tensors on ``cuda:1`` must switch to it first. CPU
    tensors (the interpreter) need nothing. Every launcher enters this around its launch.
    """
    if tensor.device.type == "cuda":
        return torch.cuda.device(tensor.device)
    return _NO_GUARD


_NO_GUARD = contextlib.nullcontext()  # reusable: holds no state


def on_device(kernel, device: torch.device):
    """The kernel to launch for tensors on ``device``: compiled on CUDA, interpreted on CPU."""
    if device.type == "cuda" and isinstance(kernel, JITFunction):
        return kernel
    return _InterpretedKernel(kernel)


class _InterpretedKernel:
    """A ``@triton.jit`` kernel run by Triton's interpreter: ``kernel[grid](*args)``.

    ``triton.language`` defines some of its own functions (``tl.zeros``, ``tl.sum``, ``tl.max``,
    ``tl.sigmoid``, ...) with ``@triton.jit``; imported without ``TRITON_INTERPRET=1`` they are
    compiled-mode objects that refuse to run in Python. For the duration of the launch they are
    swapped for interpreted twins, which is what importing under ``TRITON_INTERPRET=1`` would give.
    A kernel imported under ``TRITON_INTERPRET=1`` is already interpreted and runs as it is; both
    kinds run with :func:`_scalar_loop_bounds`.
    """

    def __init__(self, kernel):
        self._compiled_mode = isinstance(kernel, JITFunction)
        self._fn = _twin(kernel) if self._compiled_mode else kernel

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            language = _interpreted_language() if self._compiled_mode else contextlib.nullcontext()
            with _language_restored(), language, _scalar_loop_bounds():
                return self._fn[grid](*args, **kwargs)

        return launch


def _twin(kernel: JITFunction):
    if kernel not in _twins:
        _twins[kernel] = InterpretedFunction(kernel.fn)
    return _twins[kernel]


@contextlib.contextmanager
def _interpreted_language():
    # Only the names kernels reach through ``tl`` / ``tl.math``: ``triton.language.standard`` itself
    # stays as imported, since other parts of Triton check its members are compiled-mode objects.
    modules = (tl, tl.math)
    saved = [(m, name, obj) for m in modules for name, obj in vars(m).items() if isinstance(obj, JITFunction)]
    try:
        for module, name, obj in saved:
            setattr(module, name, _twin(obj))
        yield
    finally:
        for module, name, obj in saved:
            setattr(module, name, obj)


@contextlib.contextmanager
def _language_restored():
    """Put ``triton.language`` back as it was after an interpreted launch.

    The interpreter patches the builtins of ``tl.core`` (``program_id``, ``load``, ...) and some
    ``tl.core.tensor`` methods for the launch and (Triton 3.6-3.9) leaves part of that in place, so
    a kernel compiled later in the same process would trace through interpreter objects and fail
    ("'value' object has no attribute 'dtype'"). Every changed, added or removed name of those
    namespaces is restored."""
    spaces = (tl, tl.core, tl.math, tl.core.tensor)
    saved = [dict(vars(space)) for space in spaces]
    try:
        yield
    finally:
        for space, before in zip(spaces, saved):
            now = vars(space)
            for name in [n for n in now if n not in before]:
                delattr(space, name)
            for name, value in before.items():
                if now.get(name, _MISSING) is not value:
                    setattr(space, name, value)


_MISSING = object()


@contextlib.contextmanager
def _scalar_loop_bounds():
    """Lets the interpreter use a scalar tensor as a ``range()`` bound on every supported Triton.

    The interpreter holds a scalar (a kernel's int argument, ``tl.program_id``, a loaded value) as a
    one-element 1-D numpy array, and ``range()`` converts it through ``tensor.__index__``. Up to
    Triton 3.6 that is ``int(array)``, which numpy 2.4 rejects for arrays with a dimension
    ("only 0-dimensional arrays can be converted to Python scalars"; deprecated since numpy 1.25), so
    every loop with a run-time bound fails. No loop form avoids it without costing the compiled
    kernels (a ``while`` loop is not software-pipelined; a constexpr trip count recompiles per
    shape or runs masked iterations). Triton 3.9 squeezes the array first; this gives older
    interpreters the same conversion, added to the patches the interpreter applies at each launch
    and undone with them.
    """
    patch_lang = getattr(interpreter, "_patch_lang", None)
    if patch_lang is None:  # a Triton whose interpreter is organised differently: leave it as it is
        yield
        return

    def patch_lang_with_scalar_index(fn):
        scope = patch_lang(fn)
        if hasattr(scope, "set_attr"):
            scope.set_attr(tl.core.tensor, "__index__", _scalar_index)
        return scope

    interpreter._patch_lang = patch_lang_with_scalar_index
    try:
        yield
    finally:
        interpreter._patch_lang = patch_lang


def _scalar_index(t) -> int:
    data = t.handle.data
    if data.size != 1:
        raise TypeError(f"a Triton block of shape {tuple(data.shape)} cannot be used as an index")
    return int(data.reshape(()))


def interpreted(device: torch.device) -> bool:
    """Whether kernels for tensors on ``device`` run in Triton's interpreter."""
    return device.type != "cuda" or os.environ.get("TRITON_INTERPRET", "0") == "1"


def dot_dtype(dtype: torch.dtype, device: torch.device):
    """The element type to feed ``tl.dot`` for operands stored as ``dtype``.

    Half types use the tensor cores natively on GPU. The interpreter multiplies bf16 bit patterns as
    integers (it stores bf16 as uint16), so there operands are widened to fp32 first; a product of two
    bf16 (or fp16) values is exact in fp32, so the result matches a half-precision dot accumulating in fp32.
    """
    if dtype == torch.float32 or interpreted(device):
        return tl.float32
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}[dtype]


def fp32_precision(dtype: torch.dtype) -> str:
    """``tl.dot`` precision for fp32 operands: exact for fp32 callers, TF32 when the data is half anyway.

    Half-precision callers still keep fp32 intermediates (the LoRA ``x @ A^T``) in memory; TF32 keeps
    10 mantissa bits in the product, more than the 7 of bf16, at twice the speed of exact fp32.
    """
    return "ieee" if dtype == torch.float32 else "tf32"


def poisoned() -> bool:
    """Whether kernel outputs are NaN-filled before a kernel writes them (``DIT_KERNELS_POISON=1``)."""
    return os.environ.get(ENV_POISON, "0") == "1"


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """An output buffer for a kernel to fill; NaN-filled when ``DIT_KERNELS_POISON=1``."""
    out = torch.empty(shape, dtype=dtype, device=device)
    if poisoned() and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def empty_like(t: Tensor, dtype: torch.dtype | None = None) -> Tensor:
    """Like :func:`empty`, in ``t``'s layout (a transposed view gets a transposed buffer)."""
    out = torch.empty_like(t, dtype=dtype)
    if os.environ.get(ENV_POISON, "0") == "1" and out.is_floating_point():
        out.fill_(float("nan"))
    return out


def pow2_at_least(n: int, floor: int = 16) -> int:
    """Block size covering ``n``: a power of two, at least ``floor`` (``tl.dot`` needs 16)."""
    return max(floor, next_power_of_2(max(int(n), 1)))


# Host-side twins of ``triton.cdiv`` / ``triton.next_power_of_2``: those are ``@triton.jit``
# functions, and calling one from Python costs ~4 us (a launcher calls several per launch).
def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def next_power_of_2(n: int) -> int:
    """The smallest power of two >= ``n`` (``n`` >= 1), as ``triton.next_power_of_2``."""
    return 1 << (n - 1).bit_length()


def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors to fill; a small stand-in under the interpreter keeps grids short."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4
