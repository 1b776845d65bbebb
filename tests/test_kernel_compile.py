"""Every Triton kernel compiles for Hopper (sm_90), exactly as the launchers would launch it on a GPU.

No GPU is needed: Triton's compiler runs on the CPU down to a cubin (its wheel ships ``ptxas``). The
interpreter tests check the arithmetic; this checks what the interpreter cannot: compiled-mode typing
(loop-carried values, dot shapes and dtypes, constexpr branches) for the GPU configurations the
launchers pick (bf16 tensor-core dots, GPU block sizes), and that no kernel spills registers.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import torch

triton = pytest.importorskip("triton")
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from dit_kernels import backend  # noqa: E402
from dit_kernels.cross_entropy import linear_cross_entropy, linear_kl_to_teacher  # noqa: E402
from dit_kernels.multi_lora import build_lora_meta, multi_lora_sum  # noqa: E402
from dit_kernels.rms_norm import rms_norm  # noqa: E402
from dit_kernels.rope import apply_rope  # noqa: E402
from dit_kernels.swiglu import swiglu  # noqa: E402

# Under TRITON_INTERPRET=1 (how CI runs the interpreter tests) every @triton.jit is an interpreted
# function from import on and cannot be compiled; the check then runs in a fresh process without it.
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
compiled_mode = pytest.mark.skipif(INTERPRET, reason="kernels imported under TRITON_INTERPRET=1; "
                                   "test_compile_check_in_a_fresh_process runs this file without it")

_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int64: "i64", torch.int32: "i32"}
_OPTIONS = ("num_warps", "num_stages")


class _CompileForHopper:
    """Stands in for ``kernel[grid](...)``: compiles the call's specialisation instead of running it."""

    def __init__(self, kernel, compiled: list, scratch):
        self.kernel, self.compiled, self.scratch = kernel, compiled, scratch

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            options = {k: kwargs.pop(k) for k in _OPTIONS if k in kwargs}
            bound = dict(zip(self.kernel.arg_names, args)) | kwargs
            constexpr_names = {p.name for p in self.kernel.params if p.is_constexpr}
            signature = {name: "constexpr" if name in constexpr_names else _type(v) for name, v in bound.items()}
            constexprs = {name: v for name, v in bound.items() if name in constexpr_names}
            src = ASTSource(fn=self.kernel, signature=signature, constexprs=constexprs)
            binary = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
            self.compiled.append((self.kernel.fn.__name__, constexprs, _local_bytes(binary.asm["cubin"], self.scratch)))

        return launch


def _local_bytes(cubin: bytes, scratch) -> int:
    """Per-thread local memory of the kernel (register spills), read with the ``cuobjdump`` Triton ships."""
    from triton.backends.nvidia import compiler as nvidia

    tool = os.path.join(os.path.dirname(nvidia.__file__), "bin", "cuobjdump")
    path = scratch / "kernel.cubin"
    with open(path, "wb") as f:
        f.write(cubin)
    usage = subprocess.run([tool, "--dump-resource-usage", path], capture_output=True, text=True, check=True).stdout
    return int(re.search(r"LOCAL:(\d+)", usage).group(1))


def _type(v) -> str:
    if isinstance(v, torch.Tensor):
        return "*" + _TYPES[v.dtype]
    if isinstance(v, bool):
        return "i1"
    if isinstance(v, int):
        return "i32" if -(2**31) <= v < 2**31 else "i64"
    if isinstance(v, float):
        return "fp32"
    raise TypeError(f"unexpected kernel argument {v!r}")


@pytest.fixture
def compiled(monkeypatch, tmp_path):
    """Launchers believe they are on an H100 (GPU block sizes, bf16 dots); launches only compile."""
    out: list = []
    monkeypatch.setattr(backend, "interpreted", lambda device: False)
    monkeypatch.setattr(backend, "num_sms", lambda device: 132)
    monkeypatch.setattr(backend, "on_device", lambda kernel, device: _CompileForHopper(kernel, out, tmp_path))
    monkeypatch.setenv("TRITON_DEFAULT_FP_FUSION", "1")
    return out


def _assert_compiled(compiled, names):
    assert sorted({name for name, _, _ in compiled}) == sorted(names)
    spills = [(name, cx) for name, cx, n_spills in compiled if n_spills]
    assert not spills, f"register spills: {spills}"


@compiled_mode
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_multi_lora_kernels_compile(compiled, dtype):
    n_tok, d_in, d_out = 300, 256, 192
    x = torch.randn(n_tok, d_in).to(dtype).requires_grad_()
    slots = []
    for n, r in ((20, 16), (1, 128)):
        A = torch.randn(n, r, d_in).to(dtype).requires_grad_()
        B = torch.randn(n, d_out, r).to(dtype).requires_grad_()
        idx = torch.randint(-1, n, (n_tok,))
        slots.append((A, B, torch.ones(n), build_lora_meta(idx)))
    y = multi_lora_sum(x, slots, backend="triton")
    torch.autograd.grad(y, [x] + [w for A, B, _, _ in slots for w in (A, B)], torch.ones_like(y))
    _assert_compiled(compiled, ["_lora_shrink_kernel", "_lora_expand_kernel", "_lora_wgrad_kernel"])


@compiled_mode
def test_fused_ops_compile(compiled):
    x = torch.randn(6, 2560).to(torch.bfloat16).requires_grad_()
    w = torch.ones(2560, dtype=torch.bfloat16, requires_grad=True)
    torch.autograd.grad(rms_norm(x, w, 1e-6, backend="triton").sum(), (x, w))
    q = torch.randn(2, 5, 8, 128).to(torch.bfloat16).transpose(1, 2).requires_grad_()
    cos = torch.randn(2, 5, 128)
    torch.autograd.grad(apply_rope(q, cos, cos, backend="triton").sum(), q)
    gate = torch.randn(4, 9728).to(torch.bfloat16).requires_grad_()
    torch.autograd.grad(swiglu(gate, gate.detach(), backend="triton").sum(), gate)
    h = torch.randn(8, 64).to(torch.bfloat16).requires_grad_()
    lm = torch.randn(5000, 64).to(torch.bfloat16)
    labels = torch.randint(0, 5000, (8,))
    torch.autograd.grad(linear_cross_entropy(h, lm, labels, chunk_size=4, backend="triton").sum(), h)
    torch.autograd.grad(linear_kl_to_teacher(h, h.detach(), lm, chunk_size=4, backend="triton").sum(), h)
    _assert_compiled(
        compiled,
        ["_rms_norm_fwd_kernel", "_rms_norm_bwd_kernel", "_rope_kernel", "_swiglu_kernel",
         "_ce_fwd_kernel", "_ce_bwd_kernel", "_kl_fwd_kernel", "_kl_bwd_kernel"],
    )  # fmt: skip


@pytest.mark.skipif(not INTERPRET, reason="this process compiles the kernels itself")
def test_compile_check_in_a_fresh_process():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-m", "pytest", __file__, "-q", "-p", "no:cacheprovider"],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-4000:] + run.stderr[-2000:]
    assert "3 passed" in run.stdout
