"""FIND (Schwettmann et al. 2023) on the engine: a seeded suite of black-box functions with
ground-truth descriptions and code, a sandbox for agent code, agents (a least-squares / composition
search baseline and a local-LM interpretability agent), scoring as the paper does, and reports;
model-backed functions (a zoo's diffs, a record run's neurons); ``dit find pipeline`` in one call.

    from dit_engine.find import build_suite, save_suite, run_agent, score_run, write_report
"""

from .agents import SearchAgent, constant_answers, reference_answers
from .diffs import DIFF_AGENTS, describe_diffs, format_diff_table
from .lm_agent import LMAgent
from .model_backed import AskAgent, DiffBox, NeuronBox, diff_functions, neuron_boxes
from .neurons import MIN_REFERENCE, NEURON_CORRECT, neuron_functions, neuron_scores
from .pipeline import PRESETS, FindPreset, run_pipeline
from .report import write_report
from .run import AGENTS, load_answers, run_agent, score_run, select
from .sandbox import Limits, Program, Result, run_program, run_programs
from .score import NMSE_CORRECT, Answer, retrieval, score_answers, summarize
from .suite import MODEL_KINDS, BlackBox, BudgetExceeded, Function, build_suite, clean_output, load_suite, save_suite

__all__ = ["MODEL_KINDS", "MIN_REFERENCE", "NEURON_CORRECT", "neuron_functions", "neuron_scores", "neuron_boxes", "PRESETS",
           "FindPreset", "run_pipeline", "AGENTS", "DIFF_AGENTS", "describe_diffs", "format_diff_table", "Answer", "AskAgent", "DiffBox", "NeuronBox", "diff_functions", "retrieval", "BlackBox", "BudgetExceeded", "Function", "LMAgent", "Limits", "NMSE_CORRECT",
           "Program", "Result", "SearchAgent", "build_suite", "clean_output", "constant_answers", "load_answers",
           "load_suite", "reference_answers", "run_agent", "run_program", "run_programs", "save_suite", "score_answers",
           "score_run", "select", "summarize", "write_report"]
