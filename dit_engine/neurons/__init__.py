"""Neuron explanations (Bills et al. 2023), offline on the engine: record every MLP neuron over a
corpus (:mod:`.record`), explain each from its top records (:mod:`.explain`), simulate its
activations from the explanation alone, all positions in one forward (:mod:`.simulate`), score
the explanation by how well the simulation matches (:mod:`.score`), and look at it (:mod:`.viewer`)."""

from .corpus import PACKAGED, Corpus, CorpusError, build_corpus, documents
from .record import NeuronRecords, Record, RecordConfig, RecordError, mlp_activations, parse_layers, record_neurons

__all__ = ["PACKAGED", "Corpus", "CorpusError", "NeuronRecords", "Record", "RecordConfig", "RecordError",
           "build_corpus", "documents", "mlp_activations", "parse_layers", "record_neurons"]
