"""dit-engine: many LoRAs in one pass, for Diff Interpretation Tuning.

Public API: :class:`Engine` (a loaded model + tokenizer: generate, score), :class:`AdapterBatch`
and :class:`LoraSlot` (per-sequence adapters), :class:`Transformer`, :class:`ModelConfig`.
"""

from .adapters import AdapterBatch, LoraSlot
from .config import ModelConfig
from .engine import Engine
from .generate import SamplingParams
from .model import Transformer

__all__ = ["AdapterBatch", "Engine", "LoraSlot", "ModelConfig", "SamplingParams", "Transformer"]
__version__ = "0.1.0"
