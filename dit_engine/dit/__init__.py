"""DIT (Diff Interpretation Tuning): the adapter file format, its training, batched interpretation.

- :mod:`.adapter` — :class:`DitAdapter` (save, load, PEFT export, base check)
- :mod:`.training` — :class:`DitTrainConfig`, :func:`train_dit` (resumable, data-parallel)
- :mod:`.interpret` — :func:`interpret` over a zoo with the baselines, :func:`interpret_peft`
"""

from .adapter import DitAdapter
from .interpret import METHODS, diff_slot, interpret, interpret_peft
from .training import DitTrainConfig, dit_examples, train_dit

__all__ = ["METHODS", "DitAdapter", "DitTrainConfig", "diff_slot", "dit_examples", "interpret", "interpret_peft",
           "train_dit"]
