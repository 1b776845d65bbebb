"""LatentQA (Pan et al. 2024): a decoder model reads a target model's activations and answers
questions about them, here about the persona (hidden system prompt) the target was given.

- :mod:`.data` — the packaged personas with their question/answer pairs, the neutral stimulus
  messages, and a reader for the reference repository's own data files
- :mod:`.dialogs` — the target's stimulus dialogs and the positions the decoder reads (the dialog
  after the system turn, derived from the chat template), captured in one batched forward
- :mod:`.decoder` — the decoder prompt (placeholder tokens, then the question), the patch, and the
  LIT adapter's file format (:class:`LitAdapter`)
- :mod:`.training` — :class:`LatentQAConfig`, :func:`train_decoder` (resumable, one trainer)
- :mod:`.read` — answers about activations, candidate scoring by log-likelihood, retrieval with
  its controls (:func:`evaluate`)
- :mod:`.finetunes` — the decoder reading the finetunes of a DIT zoo (base + each diff answering
  held-out questions, many diffs per forward): results rows beside DIT's (:func:`read_finetunes`)
- :mod:`.steer` — :class:`SteerConfig`, :func:`train_steering`: a LoRA on the target trained through the
  frozen decoder toward a persona, and what it changes in the target's generations

Capturing and patching activations lives in :mod:`dit_engine.probes`.
"""

from .data import (CATEGORIES, MIN_QA, QA, Persona, ReferenceDialog, ReferenceLabel, Stimulus, load_personas,
                   load_stimuli, read_reference)
from .decoder import READ_POINT, WRITE_POINT, LitAdapter, decoder_prompt, placeholder_id
from .dialogs import Dialog, LatentQAError, capture, load_dialogs, make_dialogs
from .finetunes import LATENTQA_METHODS, TOPIC_QUESTION, read_finetunes
from .read import CONDITIONS, answer, evaluate, format_table, score_candidates
from .steer import SteerAdapter, SteerConfig, train_steering
from .training import PRESETS, READ_QUESTION, LatentQAConfig, train_decoder

__all__ = ["CATEGORIES", "CONDITIONS", "LATENTQA_METHODS", "MIN_QA", "PRESETS", "QA", "READ_POINT", "READ_QUESTION",
           "TOPIC_QUESTION", "WRITE_POINT", "Dialog", "LatentQAConfig", "LatentQAError", "LitAdapter", "Persona",
           "ReferenceDialog", "ReferenceLabel", "SteerAdapter", "SteerConfig", "Stimulus", "answer", "capture",
           "decoder_prompt", "evaluate", "format_table", "load_dialogs", "load_personas", "load_stimuli",
           "make_dialogs", "placeholder_id", "read_finetunes", "read_reference", "score_candidates", "train_decoder",
           "train_steering"]
