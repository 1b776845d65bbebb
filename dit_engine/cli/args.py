"""Argument types of the ``dit`` command: each checks one value where it is parsed and says what
was expected, so a bad value is a usage error (exit 2) naming the argument; plus ``--set``."""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
from pathlib import Path

import torch

from ..config import TARGET_MODULES
from ..diffgen import DiffGenConfig
from ..dit import DitTrainConfig
from ..evaluate import METHODS
from ..pipeline import PipelineConfig
from ..tasks import TASKS

DEBUG_ENV = "DIT_DEBUG"  # set (not 0) for tracebacks, like --debug


class UsageError(Exception):
    """Arguments that parse one by one but do not fit together: reported like argparse's errors (exit 2)."""


def say_error(prog: str, message: str) -> None:
    one_line = "; ".join(part.strip() for part in str(message).splitlines() if part.strip())
    print(f"{prog}: error: {one_line}", file=sys.stderr)


# ---- argument types: each checks one value and says what was expected -----------------------------
def text_arg(s: str) -> str:
    """Any string the OS passed that is valid UTF-8 (non-UTF-8 bytes arrive surrogate-escaped)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raw = s.encode("utf-8", "surrogateescape")
        raise argparse.ArgumentTypeError(f"{raw!r} is not valid UTF-8 text") from None
    return s


def nonempty_text(s: str) -> str:
    if not text_arg(s):
        raise argparse.ArgumentTypeError("empty text; expected a non-empty string")
    return s


def path_arg(s: str) -> Path:
    s = nonempty_text(s)
    return Path(s).expanduser()


def int_arg(s: str) -> int:
    try:
        return int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text_arg(s)!r} is not an integer") from None


def positive_int(s: str) -> int:
    n = int_arg(s)
    if n < 1:
        raise argparse.ArgumentTypeError(f"{n} is not a positive integer (expected >= 1)")
    return n


def nonnegative_int(s: str) -> int:
    n = int_arg(s)
    if n < 0:
        raise argparse.ArgumentTypeError(f"{n} is negative (expected an integer >= 0)")
    return n


def finite_float(s: str) -> float:
    try:
        x = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text_arg(s)!r} is not a number") from None
    if not math.isfinite(x):
        raise argparse.ArgumentTypeError(f"{s!r} is not a finite number")
    return x


def nonnegative_float(s: str) -> float:
    x = finite_float(s)
    if x < 0:
        raise argparse.ArgumentTypeError(f"{s} is negative (expected a number >= 0)")
    return x


def positive_float(s: str) -> float:
    x = finite_float(s)
    if x <= 0:
        raise argparse.ArgumentTypeError(f"{s} is not positive (expected a number > 0)")
    return x


def probability(s: str) -> float:
    x = finite_float(s)
    if not 0 < x <= 1:
        raise argparse.ArgumentTypeError(f"{s} is outside (0, 1] (expected 0 < p <= 1)")
    return x


def fraction(s: str) -> float:
    x = finite_float(s)
    if not 0 <= x < 1:
        raise argparse.ArgumentTypeError(f"{s} is outside [0, 1) (expected 0 <= fraction < 1)")
    return x


def key_value(s: str) -> tuple[str, str]:
    key, eq, value = text_arg(s).partition("=")
    if not eq or not key.strip():
        raise argparse.ArgumentTypeError(f"{s!r} is not KEY=VALUE (expected e.g. topic=chess)")
    return key.strip(), value


def targets_arg(s: str) -> tuple[str, ...]:
    names = tuple(t.strip() for t in text_arg(s).split(",") if t.strip())
    bad = [t for t in names if t not in TARGET_MODULES]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"{s!r}: expected a comma list of {','.join(TARGET_MODULES)}")
    return names


def methods_arg(s: str) -> tuple[str, ...]:
    names = tuple(m.strip() for m in text_arg(s).split(",") if m.strip())
    bad = [m for m in names if m not in METHODS]
    if not names or bad:
        raise argparse.ArgumentTypeError(f"{s!r}: expected a comma list of {','.join(METHODS)}")
    return names


def latentqa_methods_arg(s: str) -> tuple[str, ...]:
    """A comma list of the LatentQA reading methods (``dit latentqa interpret --methods``)."""
    from ..latentqa.finetunes import LATENTQA_METHODS

    names = tuple(m.strip() for m in text_arg(s).split(",") if m.strip())
    if not names or any(m not in LATENTQA_METHODS for m in names):
        raise argparse.ArgumentTypeError(f"{s!r}: expected a comma list of {','.join(LATENTQA_METHODS)}")
    return names


def int_list(s: str) -> tuple[int, ...]:
    parts = [p.strip() for p in text_arg(s).split(",") if p.strip()]
    try:
        ns = tuple(int(p) for p in parts)
    except ValueError:
        ns = ()
    if not ns or any(n < 1 for n in ns):
        raise argparse.ArgumentTypeError(f"{s!r}: expected a comma list of positive integers, e.g. 4,8")
    return ns


def device_arg(s: str) -> str:
    try:
        torch.device(nonempty_text(s))
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{s!r} is not a device (expected cpu, cuda, cuda:1, ...)") from None
    return s


# --set FIELD=VALUE: a field of PipelineConfig, or of its job configs as diffs.FIELD / dit.FIELD,
# typed like its default; these must be positive, the other numbers only non-negative.
_SUBCONFIGS = {"diffs": DiffGenConfig, "dit": DitTrainConfig}
_POSITIVE = {"n_train", "n_test", "interpret_batch_size", "epochs", "chunk_diffs", "rows_per_diff", "n_backdoor",
             "candidates", "max_answer_tokens", "n_verify", "gen_batch_size", "rank", "batch_size", "grad_accum",
             "save_every", "lr", "alpha", "kl_target_tokens"}
_CHOICES = {"task": tuple(sorted(TASKS)), "strategy": ("select", "prefix"), "schedule": ("cosine", "linear", "constant"),
            "lr_schedule": ("cosine", "linear", "constant"),
            "adapter": ("shipped", "none"), "compute_dtype": ("bfloat16", "float32")}


# The job configs' fields the pipeline sets per stage itself (PipelineConfig's docstring): a --set of
# one would be silently replaced, so it is refused, naming the pipeline field that decides it.
_STAGE_FIELDS = {"diffs.task": "task", "diffs.n": "n_train / n_test", "diffs.split": "n_train / n_test (the training and held-out zoos)",
                 "diffs.rank": "rank / test_ranks", "diffs.seed": "seed", "dit.task": "task", "dit.seed": "seed",
                 "dit.max_diffs": "n_train / scaling"}


def _settable_fields() -> dict[str, dataclasses.Field]:
    out = {f.name: f for f in dataclasses.fields(PipelineConfig) if f.name not in _SUBCONFIGS}
    for prefix, cls in _SUBCONFIGS.items():
        out.update({f"{prefix}.{f.name}": f for f in dataclasses.fields(cls)
                    if f"{prefix}.{f.name}" not in _STAGE_FIELDS})
    return out


PIPELINE_FIELDS = _settable_fields()


def pipeline_setting(s: str) -> tuple[str, object]:
    """``FIELD=VALUE`` for :class:`~dit_engine.pipeline.PipelineConfig` (``diffs.X`` / ``dit.X`` for its
    job configs), typed like the field's default."""
    key, value = key_value(s)
    if key in _STAGE_FIELDS:
        raise argparse.ArgumentTypeError(f"{key!r} is set by the pipeline for each stage; set {_STAGE_FIELDS[key]} instead")
    if key not in PIPELINE_FIELDS:
        raise argparse.ArgumentTypeError(f"{key!r} is not a pipeline setting; known: {', '.join(PIPELINE_FIELDS)}")
    field = PIPELINE_FIELDS[key]
    default = field.default_factory() if field.default is dataclasses.MISSING else field.default
    leaf = key.rsplit(".", 1)[-1]
    try:
        if isinstance(default, tuple) and leaf != "targets":
            return key, int_list(value) if value.strip() else ()
        if isinstance(default, tuple):
            return key, targets_arg(value)
        if isinstance(default, bool):
            if value not in ("true", "false"):
                raise argparse.ArgumentTypeError(f"{value!r} is not true or false")
            return key, value == "true"
        if isinstance(default, int) or (default is None and str(field.type).startswith("int")):
            if leaf == "seed":
                return key, int_arg(value)
            return key, positive_int(value) if leaf in _POSITIVE else nonnegative_int(value)
        if isinstance(default, float):
            return key, positive_float(value) if leaf in _POSITIVE else nonnegative_float(value)
        if leaf in _CHOICES and value not in _CHOICES[leaf]:
            raise argparse.ArgumentTypeError(f"{value!r} is not one of {', '.join(_CHOICES[leaf])}")
        if leaf == "adapter":
            return key, None if value == "none" else value
        return key, nonempty_text(value)
    except argparse.ArgumentTypeError as e:
        raise argparse.ArgumentTypeError(f"{key}: {e}") from None


def apply_settings(cfg: PipelineConfig, settings: dict[str, object]) -> PipelineConfig:
    top = {k: v for k, v in settings.items() if "." not in k}
    for prefix in _SUBCONFIGS:
        sub = {k.split(".", 1)[1]: v for k, v in settings.items() if k.startswith(prefix + ".")}
        if sub:
            top[prefix] = dataclasses.replace(getattr(cfg, prefix), **sub)
    return dataclasses.replace(cfg, **top)
