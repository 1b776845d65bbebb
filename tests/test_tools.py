"""tools/: the scripts for people (GPU check, bench plots, profiler, GGUF converter), run as a user would."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
import zipfile
from pathlib import Path

import pytest
from test_gguf import _write_tiny_gguf

REPO = Path(__file__).resolve().parents[1]
TOOLS = REPO / "tools"
SVG = "{http://www.w3.org/2000/svg}"


def run(*cmd: str | Path, cwd: Path = REPO, env: dict | None = None, timeout: int = 120) -> subprocess.CompletedProcess:
    import os

    full_env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    return subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


def tool(name: str, *args: str | Path, **kw) -> subprocess.CompletedProcess:
    return run(sys.executable, TOOLS / name, *args, **kw)


# ---- every tool: --help, and usage errors exit 2 with one line ---------------------------------------
@pytest.mark.parametrize("name", ["gpu_check.sh", "gpu_prepare.sh"])
def test_shell_tools_parse_and_answer_help(name):
    assert run("bash", "-n", TOOLS / name).returncode == 0
    r = run("bash", TOOLS / name, "--help")
    assert r.returncode == 0 and r.stdout.startswith("usage: bash tools/" + name)
    bad = run("bash", TOOLS / name, "--no-such-flag")
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "--no-such-flag" in bad.stderr


@pytest.mark.parametrize("name", ["plot_bench.py", "profile_kernels.py", "gguf_to_hf.py"])
def test_python_tools_answer_help_and_exit_2_on_bad_usage(name):
    r = tool(name, "--help")
    assert r.returncode == 0 and "usage: tools/" + name in r.stdout
    assert tool(name, "--no-such-flag").returncode == 2


# ---- gpu_check.sh ------------------------------------------------------------------------------------
def _steps(dry_run_stdout: str) -> list[str]:
    return [line.split()[2] for line in dry_run_stdout.splitlines() if line.strip().startswith("step ")]


def test_gpu_check_dry_run_plans_every_step_in_order():
    r = run("bash", TOOLS / "gpu_check.sh", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert _steps(r.stdout) == ["env", "tests", "kernels", "decode", "model", "dit"]
    assert "DIT_KERNELS=auto" in r.stdout and "-m gpu tests" in r.stdout
    assert "benches/bench_kernels.py" in r.stdout and "benches/bench_decode.py" in r.stdout
    assert "smollm2 and (diffgen or interpret)" in r.stdout
    assert _steps(run("bash", TOOLS / "gpu_check.sh", "--dry-run", "--quick").stdout) == ["env", "tests"]
    assert "tests" not in _steps(run("bash", TOOLS / "gpu_check.sh", "--dry-run", "--skip-tests").stdout)
    only = run("bash", TOOLS / "gpu_check.sh", "--dry-run", "--only", "dit,model")
    assert _steps(only.stdout) == ["env", "model", "dit"]


@pytest.mark.parametrize("args,needle", [
    (["--budget", "ten"], "--budget"), (["--budget", "5"], "at least 30"), (["--budget"], "needs a value"),
    (["--quick", "--skip-tests"], "exclude"), (["--only", "lint"], "lint"),
])  # fmt: skip
def test_gpu_check_usage_errors_exit_2(args, needle):
    r = run("bash", TOOLS / "gpu_check.sh", "--dry-run", *args)
    assert r.returncode == 2 and needle in r.stderr and r.stdout == ""


def _fake_tree(tmp_path: Path) -> Path:
    """A source tree in the merged layout: top-level kernels/, split model parts, one wheel."""
    root = tmp_path / "repo"
    (root / "tools").mkdir(parents=True)
    shutil.copy(TOOLS / "gpu_check.sh", root / "tools")
    (root / "kernels").mkdir()
    (root / "kernels" / "__init__.py").write_text("")
    (root / ".gguf").mkdir()
    (root / ".gguf" / "part-aa").write_bytes(b"PK\x03\x04half")
    (root / ".gguf" / "part-ab").write_bytes(b"other half")
    (root / ".whl").mkdir()
    with zipfile.ZipFile(root / ".whl" / "zz_tools_probe-1.0-py3-none-any.whl", "w") as z:
        z.writestr("zz_tools_probe/__init__.py", "")
        z.writestr("zz_tools_probe-1.0.dist-info/METADATA", "Name: zz-tools-probe\n")
    with zipfile.ZipFile(root / ".whl" / "pytest-99-py3-none-any.whl", "w") as z:  # importable already
        z.writestr("pytest/__init__.py", "")
    return root


def test_gpu_check_dry_run_sees_the_merged_layout_parts_and_wheels(tmp_path):
    root = _fake_tree(tmp_path)
    r = run("bash", root / "tools" / "gpu_check.sh", "--dry-run", cwd=root)
    assert r.returncode == 0, r.stderr
    assert "kernels/ as dit_kernels" in r.stdout
    pythonpath = next(ln for ln in r.stdout.splitlines() if ln.strip().startswith("PYTHONPATH")).split()[-1].split(":")
    assert pythonpath[0] == str(root) and "zz_tools_probe" in pythonpath[2]
    assert not any(p.endswith("pytest-99-py3-none-any") for p in pythonpath)
    assert "missing: zz_tools_probe" in r.stdout and "installed already (pytest)" in r.stdout
    assert "reassemble 2 parts" in r.stdout and "engine-home" in r.stdout
    (root / ".gguf" / "part-ab").unlink()
    assert "did not arrive" in run("bash", root / "tools" / "gpu_check.sh", "--dry-run", cwd=root).stdout


def test_gpu_check_today_layout_has_no_symlink():
    r = run("bash", TOOLS / "gpu_check.sh", "--dry-run")
    has_top_kernels = (REPO / "kernels" / "__init__.py").is_file()
    assert ("kernels/ as dit_kernels" in r.stdout) == has_top_kernels


def test_gpu_check_model_step_rebuilds_a_split_gguf_on_cpu(tmp_path):
    """The model step for real (CPU, --allow-cpu): two parts of a raw GGUF -> the default model dir."""
    gguf = tmp_path / "tiny.gguf"
    _write_tiny_gguf(gguf, tie=True)
    data = gguf.read_bytes()
    parts = tmp_path / "parts"
    parts.mkdir()
    (parts / "part-aa").write_bytes(data[: len(data) // 2])
    (parts / "part-ab").write_bytes(data[len(data) // 2 :])
    before = sorted((REPO / "benches" / "results").glob("*.json"))
    out, home = tmp_path / "out", tmp_path / "home"
    r = run("bash", TOOLS / "gpu_check.sh", "--allow-cpu", "--only", "model", "--parts", parts, "--home", home,
            "--out", out, timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    assert "a raw GGUF" in (out / "logs" / "model.log").read_text()
    models = list((home / "models").iterdir())
    assert len(models) == 1 and (models[0] / "config.json").is_file() and (models[0] / "tokenizer.json").is_file()
    summary = r.stdout[r.stdout.index("gpu_check summary") :]
    assert "model     ok" in summary and "no CUDA: harness only, nothing saved" in summary
    assert json.loads((out / "gpu_check.json").read_text())["steps"][-1]["status"] == "ok"
    assert sorted((REPO / "benches" / "results").glob("*.json")) == before  # a CPU run writes no results


def test_gpu_check_model_step_without_parts_or_cache_is_skipped_not_failed(tmp_path):
    r = run("bash", TOOLS / "gpu_check.sh", "--allow-cpu", "--only", "model,dit", "--parts", tmp_path / "none",
            "--home", tmp_path / "empty-home", "--out", tmp_path / "out", timeout=300)  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:]
    assert "model     skipped" in r.stdout and "dit       skipped" in r.stdout


# ---- gpu_prepare.sh ------------------------------------------------------------------------------------
def test_gpu_prepare_splits_a_file_in_two_parts_and_prints_the_carry_lists(tmp_path):
    root = tmp_path / "repo"
    (root / "tools").mkdir(parents=True)
    shutil.copy(TOOLS / "gpu_prepare.sh", root / "tools")
    blob = tmp_path / "model.gguf"
    blob.write_bytes(bytes(range(256)) * 1001)
    r = run("bash", root / "tools" / "gpu_prepare.sh", "--file", blob, "--skip-wheels", cwd=root)
    assert r.returncode == 0, r.stderr
    a, b = (root / ".gguf" / "part-aa").read_bytes(), (root / ".gguf" / "part-ab").read_bytes()
    assert a + b == blob.read_bytes() and abs(len(a) - len(b)) <= 1
    assert 'call 1  carry [".gguf/part-aa"]' in r.stdout and 'call 2  carry [".gguf/part-ab"]' in r.stdout
    assert "bash tools/gpu_check.sh --commit" in r.stdout
    missing = run("bash", root / "tools" / "gpu_prepare.sh", "--file", tmp_path / "nope", "--skip-wheels", cwd=root)
    assert missing.returncode == 1 and "no such file" in missing.stderr


# ---- gguf_to_hf.py -------------------------------------------------------------------------------------
def test_gguf_to_hf_converts_and_verifies_a_tiny_gguf(tmp_path):
    gguf = tmp_path / "tiny.gguf"
    config, _ = _write_tiny_gguf(gguf, tie=False)
    out = tmp_path / "hf"
    r = tool("gguf_to_hf.py", gguf, "--out", out, "--verify")
    assert r.returncode == 0, r.stderr
    got = json.loads((out / "config.json").read_text())
    assert got["model_type"] == "llama" and got["hidden_size"] == config.hidden_size and not got["tie_word_embeddings"]
    assert "verified:" in r.stdout and f"{config.num_hidden_layers} layers" in r.stdout
    again = tool("gguf_to_hf.py", gguf, "--out", out)
    assert again.returncode == 2 and "already exists" in again.stderr


def test_gguf_to_hf_clear_errors(tmp_path):
    r = tool("gguf_to_hf.py", tmp_path / "missing.gguf", "--out", tmp_path / "o")
    assert r.returncode == 2 and r.stderr.strip() == f"gguf_to_hf: {tmp_path / 'missing.gguf'}: no such file"
    text = tmp_path / "notes.gguf"
    text.write_text("hello")
    r = tool("gguf_to_hf.py", text, "--out", tmp_path / "o")
    assert r.returncode == 2 and "not a GGUF file" in r.stderr
    qwen = tmp_path / "qwen.gguf"
    _write_tiny_gguf(qwen, tie=True, arch="qwen2")
    r = tool("gguf_to_hf.py", qwen, "--out", tmp_path / "o")
    assert r.returncode == 1 and "'qwen2' is not supported" in r.stderr and r.stderr.count("\n") == 1
    assert not (tmp_path / "o").exists()
    assert tool("gguf_to_hf.py", qwen).returncode == 2  # --out is required


# ---- profile_kernels.py --------------------------------------------------------------------------------
def test_profile_kernels_lora_on_cpu_prints_top_ops_and_writes_a_trace(tmp_path):
    trace = tmp_path / "lora.json"
    r = tool("profile_kernels.py", "lora", "--tokens", "16", "--d-in", "32", "--d-out", "48", "--rank", "4",
             "--adapters", "4", "--backward", "--iters", "2", "--warmup", "1", "--trace", trace, "--proton")  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "multi_lora tokens 16, d_in 32, d_out 48, rank 4, 4 adapters, fwd+bwd" in r.stdout
    assert "aten::mm" in r.stdout and "proton: skipped (needs a GPU)" in r.stdout
    events = json.loads(trace.read_text())["traceEvents"]
    assert any(e.get("name") == "iter1" for e in events)


def test_profile_kernels_model_decode_on_cpu(tmp_path):
    trace = tmp_path / "model.json"
    r = tool("profile_kernels.py", "model", "--batch", "2", "--seq", "4", "--decode", "--adapters", "2", "--rank", "2",
             "--iters", "2", "--warmup", "1", "--trace", trace)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "decode step, batch 2 after a 4-token prefill, 2 rank-2 LoRAs" in r.stdout and trace.is_file()


@pytest.mark.parametrize("args,needle", [
    (["lora", "--tokens", "4", "--adapters", "8"], "more than --tokens"), (["lora", "--iters", "0"], "--iters"),
    (["model", "--model", "/no/such/dir"], "not a directory"), (["lora", "--backend", "fast"], "invalid choice"),
])  # fmt: skip
def test_profile_kernels_usage_errors(args, needle):
    r = tool("profile_kernels.py", *args)
    assert r.returncode == 2 and needle in r.stderr


# ---- plot_bench.py -------------------------------------------------------------------------------------
def _synthetic_results(path: Path) -> dict:
    """A results file in the shape benches/_results.py + bench_kernels.py + bench_decode.py write."""
    bw, gemm = 3000.0, 600.0  # GB/s, TFLOP/s
    rows = []

    def row(op, case, impl, bytes_, flops, seconds):
        roof = max(bytes_ / (bw * 1e9), flops / (gemm * 1e12))
        rows.append({"op": op, "case": case, "impl": impl, "shape": {}, "time_us": seconds * 1e6, "bytes": bytes_,
                     "flops": flops, "gb_per_s": bytes_ / seconds / 1e9, "tflop_per_s": flops / seconds / 1e12,
                     "roofline_fraction": roof / seconds, "peak_extra_mb": 1.0})  # fmt: skip

    for case, bytes_, flops in (("decode.qwen3-4b.up", 4e7, 2.5e8), ("train_zoo.qwen3-4b.up", 5e8, 1.2e13)):
        for k, impl in enumerate(("ours", "dense_einsum", "gather_bmm", "peft_loop", "base_gemm")):
            row("multi_lora", case, impl, bytes_, flops, (1 + 3 * k) * max(bytes_ / 3e12, flops / 6e14) * 1.3)
    row("rms_norm", "rms_norm.d2560.fwd", "ours", 1.6e8, 0, 1e-4)
    row("rms_norm", "rms_norm.d2560.fwd", "torch", 1.6e8, 0, 3e-4)
    ours = {r["case"]: r["time_us"] for r in rows if r["impl"] == "ours"}
    for r in rows:
        r["ours_speedup"] = r["time_us"] / ours[r["case"]]
    prov = {"device": "Synthetic GPU", "commit": "abc123", "dirty": False, "date": "2026-01-01T00:00:00+00:00", "torch": "2.11"}
    doc = {"device": "Synthetic GPU",
           "kernels": {**prov, "triton": "3.6.0", "dtype": "torch.bfloat16", "copy_gb_per_s": bw, "gemm_tflop_per_s": gemm,
                       "rows": rows},
           "decode": {**prov, "model": "random", "rows": [
               {"n_adapters": n, "batch": 256, "steps": 32, "prefill": 128, "tokens_per_s": t, "median_s": 1.0}
               for n, t in ((0, 9000.0), (64, 7000.0), (256, 6000.0))]}}  # fmt: skip
    path.write_text(json.dumps(doc))
    return doc


def _marks(svg: Path, tag: str, cls: str) -> list[ET.Element]:
    return [e for e in ET.parse(svg).getroot().iter(f"{SVG}{tag}") if e.get("class") == cls]


def test_plot_bench_draws_every_chart_with_one_mark_per_row(tmp_path):
    doc = _synthetic_results(tmp_path / "Synthetic_GPU.json")
    rows = doc["kernels"]["rows"]
    r = tool("plot_bench.py", tmp_path / "Synthetic_GPU.json", "--out", tmp_path / "plots")
    assert r.returncode == 0, r.stderr
    plots = tmp_path / "plots"
    names = sorted(p.name for p in plots.iterdir())
    assert names == [f"Synthetic_GPU.{n}.svg" for n in ("decode", "fraction", "ratios", "roofline")]
    assert len(_marks(plots / "Synthetic_GPU.roofline.svg", "circle", "mark")) == sum(1 for x in rows if x["flops"])
    assert len(_marks(plots / "Synthetic_GPU.roofline.svg", "polyline", "roof")) == 1
    assert len(_marks(plots / "Synthetic_GPU.fraction.svg", "rect", "bar")) == len(rows)
    assert len(_marks(plots / "Synthetic_GPU.ratios.svg", "rect", "bar")) == sum(1 for x in rows if x["impl"] != "ours")
    assert len(_marks(plots / "Synthetic_GPU.decode.svg", "rect", "bar")) == 3
    # the marks sit where the numbers say: the slowest dense_einsum is left of ours in the fraction chart
    bars = {e.find(f"{SVG}title").text.split(":")[0]: float(e.get("width"))
            for e in _marks(plots / "Synthetic_GPU.fraction.svg", "rect", "bar")}
    assert bars["decode.qwen3-4b.up / ours"] > bars["decode.qwen3-4b.up / dense_einsum"]
    assert "Synthetic GPU" in (plots / "Synthetic_GPU.roofline.svg").read_text()


def test_plot_bench_errors(tmp_path):
    r = tool("plot_bench.py", tmp_path / "absent.json")
    assert r.returncode == 2 and "no such file" in r.stderr
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    r = tool("plot_bench.py", bad, "--out", tmp_path / "p")
    assert r.returncode == 1 and "not a readable results file" in r.stderr and r.stderr.count("\n") == 1
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"device": "x", "runtime": {"results": []}}))
    r = tool("plot_bench.py", other, "--out", tmp_path / "p")
    assert r.returncode == 1 and "nothing to draw" in r.stderr
