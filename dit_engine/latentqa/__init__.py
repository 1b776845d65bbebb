"""LatentQA (Pan et al. 2024): a decoder model reads a target model's activations and answers
questions about them, here about the persona (hidden system prompt) the target was given.

What exists so far is the data (:mod:`.data`): the packaged personas with their question/answer
pairs, the neutral stimulus messages the target answers under them, and a reader for the reference
repository's own data files. Capturing and patching activations lives in :mod:`dit_engine.probes`.
"""

from .data import (CATEGORIES, MIN_QA, QA, Persona, ReferenceDialog, ReferenceLabel, Stimulus, load_personas,
                   load_stimuli, read_reference)

__all__ = ["CATEGORIES", "MIN_QA", "QA", "Persona", "ReferenceDialog", "ReferenceLabel", "Stimulus", "load_personas",
           "load_stimuli", "read_reference"]
