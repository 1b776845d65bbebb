"""The ``dit`` parsers of the rooms beside DIT (``latentqa``, ``neurons``, ``find``): their commands, flags and
help, built from :mod:`.parser_base` (``parser.build_parser`` adds them)."""

from __future__ import annotations

from ..find import AGENTS as FIND_AGENTS
from ..find import DIFF_AGENTS as FIND_DIFF_AGENTS
from ..find import MIN_REFERENCE as FIND_MIN_REFERENCE
from ..latentqa import PRESETS as LATENTQA_PRESETS
from ..latentqa import LatentQAConfig
from ..latentqa.steer import SteerConfig
from ..neurons import PACKAGED, RecordConfig
from ..tasks import TASKS
from .args import (int_arg, latentqa_methods_arg, nonempty_text, nonnegative_float, nonnegative_int, path_arg,
                   positive_float, positive_int)
from .parser_base import Parser, _checkpoint_arg, _leaf, _model_args


def latentqa_parsers(sub) -> None:
    lp = sub.add_parser("latentqa", help="LatentQA: a decoder that reads activations and answers questions about them",
                        description="Train a LatentQA decoder (base + LIT adapter) on a target model's activations "
                                    "over persona dialogs, and read held-out personas with it.")
    ls = lp.add_subparsers(dest="latentqa_cmd", metavar="LATENTQA_COMMAND", required=True, parser_class=Parser)
    ref = LATENTQA_PRESETS["reference"]
    p = _leaf(ls, "train", help="train the LatentQA decoder on persona dialogs (resumable)",
              description="The target (the base model) answers neutral messages under each persona's hidden "
                          "system prompt; its residual at --read-point over the dialog (the system prompt masked) "
                          "is written over placeholder tokens of the decoder (the base + a LIT adapter) at "
                          "--write-point, which learns to answer questions about the persona. --preset reference "
                          "is the reference recipe; --preset laptop is sized for a 2-core CPU (14.5 min measured). "
                          "A flag overrides the preset's value. Rerunning the same command resumes.")
    _model_args(p)
    p.add_argument("--out", required=True, type=path_arg,
                   help="decoder directory (dialogs and checkpoint inside; rerun resumes)")
    p.add_argument("--preset", default="reference", choices=list(LATENTQA_PRESETS),
                   help="reference: the reference recipe on every packaged persona (default); laptop: 2 epochs at "
                        "lr 1e-4, batch 8, 16-token answers, for a 2-core CPU")
    g = p.add_argument_group("overrides of the preset (defaults: the reference recipe's)")
    g.add_argument("--epochs", type=positive_int, default=None, help=f"default {ref.epochs}")
    g.add_argument("--lr", type=positive_float, default=None, help=f"default {ref.lr}")
    g.add_argument("--rank", type=positive_int, default=None, help=f"LIT adapter rank, default {ref.rank}")
    g.add_argument("--alpha", type=positive_float, default=None, help=f"scale = alpha / rank, default {ref.alpha}")
    g.add_argument("--batch-size", type=positive_int, default=None, help=f"default {ref.batch_size}")
    g.add_argument("--read-point", type=nonempty_text, default=None, metavar="POINT",
                   help=f"where the target is read: hidden.K or a relative depth (default {ref.read_point})")
    g.add_argument("--write-point", type=nonempty_text, default=None, metavar="POINT",
                   help=f"where the decoder is written (default {ref.write_point}: the output of its block 0)")
    g.add_argument("--patch-mode", default=None, choices=["replace", "add_norm"],
                   help="replace the placeholders' activations (default) or add norm-matched")
    g.add_argument("--stimuli-per-persona", type=positive_int, default=None,
                   help=f"dialogs per train persona, default {ref.stimuli_per_persona}")
    g.add_argument("--test-stimuli", type=positive_int, default=None,
                   help=f"held-out messages every test persona answers, default {ref.test_stimuli}")
    g.add_argument("--train-personas", dest="n_train_personas", type=nonnegative_int, default=None, metavar="N",
                   help="train on the first N train personas only (default: all)")
    g.add_argument("--test-personas", dest="n_test_personas", type=nonnegative_int, default=None, metavar="N",
                   help="hold out the first N test personas only (default: all)")
    g.add_argument("--max-answer-tokens", type=positive_int, default=None,
                   help=f"length of the target's answers, default {ref.max_answer_tokens}")
    g.add_argument("--personas", dest="personas_file", type=path_arg, default=None, metavar="FILE",
                   help="personas JSON in the packaged format (default: the packaged personas)")
    g.add_argument("--stimuli", dest="stimuli_file", type=path_arg, default=None, metavar="FILE",
                   help="stimulus messages JSON in the packaged format (default: the packaged ones)")
    g.add_argument("--seed", type=int_arg, default=None)
    _checkpoint_arg(p, LatentQAConfig)

    p = _leaf(ls, "read", help="read held-out personas with a trained decoder: retrieval and answers",
              description="For the held-out dialogs of a 'dit latentqa train' directory, score every held-out "
                          "persona's answer by the decoder's log-likelihood given the dialog's activations "
                          "(retrieval@1, @5, MRR, with 95% bootstrap intervals), against the decoder given zero "
                          "or another persona's activations and the untrained decoder; also generate the "
                          "decoder's answers.")
    _model_args(p)
    p.add_argument("--adapter", required=True, type=path_arg, metavar="DIR", help="a 'dit latentqa train' directory")
    p.add_argument("--question", default=None, type=nonempty_text,
                   help="what the decoder is asked (default: the one it was trained to be read with)")
    p.add_argument("--max-new-tokens", type=positive_int, default=24, help="length of the generated answers")
    p.add_argument("--batch-size", type=positive_int, default=128,
                   help="candidate rows per forward (each holds a copy of its prompt's KV cache)")
    p.add_argument("--json", action="store_true", help="the metrics and answers as one JSON object")
    p.add_argument("--out", type=path_arg, default=None, metavar="DIR",
                   help="also write the report there: report.html, report.md, metrics.json, charts/ (with the "
                        "machine, commit and date)")
    _latentqa_interpret_parser(ls)
    _latentqa_steer_parser(ls)


def _latentqa_interpret_parser(ls) -> None:
    from ..latentqa.finetunes import LATENTQA_METHODS, TOPIC_QUESTION

    p = _leaf(ls, "interpret", help="read every diff of a zoo with the decoder: results rows next to DIT's",
              description="For every diff of a zoo, the finetuned model (base + diff) answers a held-out question "
                          "of the task (latentqa; with its trigger: latentqa+trigger); its residual over that "
                          "dialog (after the system turn) is read by the LatentQA decoder, which answers --question. "
                          "Many diffs run in one batch. Rows in 'dit interpret' form go to --out (reruns resume), "
                          "so 'dit evaluate' scores them next to DIT and the baselines.")
    _model_args(p)
    p.add_argument("--adapter", required=True, type=path_arg, metavar="DIR", help="a 'dit latentqa train' directory")
    p.add_argument("--zoo", required=True, type=path_arg)
    p.add_argument("--methods", default=LATENTQA_METHODS, type=latentqa_methods_arg,
                   help=f"comma list of: {', '.join(LATENTQA_METHODS)} (default both)")
    p.add_argument("--split", default=None, type=nonempty_text)
    p.add_argument("--id", action="append", default=None, metavar="DIFF_ID", type=nonempty_text)
    p.add_argument("--question", default=None, type=nonempty_text,
                   help=f"what the decoder is asked (default {TOPIC_QUESTION!r})")
    p.add_argument("--stimulus", default=None, type=nonempty_text, metavar="MESSAGE",
                   help="what the finetuned model answers (default: a held-out question of the task per diff)")
    p.add_argument("--dialogs", type=positive_int, default=1,
                   help="dialogs per diff, their activations read together (default 1)")
    p.add_argument("--task", default="hidden-topic", choices=sorted(TASKS))
    p.add_argument("--max-new-tokens", type=positive_int, default=20, help="length of the decoder's answers")
    p.add_argument("--max-answer-tokens", type=positive_int, default=None,
                   help="length of the finetuned model's answer (default: what the decoder was trained on)")
    p.add_argument("--batch-size", type=positive_int, default=64, help="diffs per batch")
    p.add_argument("--out", required=True, type=path_arg, help="results JSONL (appended; reruns resume)")


def _latentqa_steer_parser(ls) -> None:
    d = SteerConfig()
    p = _leaf(ls, "steer", help="steer the target toward a persona through a trained decoder, and measure it",
              description="Train a LoRA on the target (the base model, no system prompt) by back-propagating through "
                          "the frozen LatentQA decoder of --adapter so that the decoder reads --persona off the "
                          "target's activations over the train stimuli; then, on the held-out stimuli, compare the "
                          "steered and the unsteered target's generations (one sampling seed): the base model's "
                          "likelihood lift of each generation under the persona's system prompt, how many use the "
                          "persona's words, and the decoder's retrieval of the persona, each with 95% bootstrap "
                          "intervals. Persona ids: those of the decoder run's dialogs.json, or of the personas it "
                          "was trained with (the packaged ones by default). Rerunning the same command resumes.")
    _model_args(p)
    p.add_argument("--adapter", required=True, type=path_arg, metavar="DIR", help="a 'dit latentqa train' directory")
    p.add_argument("--persona", required=True, type=nonempty_text, metavar="ID", help="the persona to steer toward")
    p.add_argument("--out", required=True, type=path_arg,
                   help="steering directory (LoRA, steer.json, checkpoint inside; rerun resumes)")
    p.add_argument("--steps", type=positive_int, default=d.steps, help="optimizer steps (default %(default)s)")
    p.add_argument("--lr", type=positive_float, default=d.lr, help="default %(default)s (a default, not tuned)")
    p.add_argument("--rank", type=positive_int, default=d.rank, help="steering LoRA rank (default %(default)s)")
    p.add_argument("--alpha", type=positive_float, default=d.alpha, help="scale = alpha / rank (default %(default)s)")
    p.add_argument("--batch-size", type=positive_int, default=d.batch_size,
                   help="decoder rows (prompt, QA pair) per step (default %(default)s)")
    p.add_argument("--train-prompts", dest="n_train_prompts", type=positive_int, default=None, metavar="N",
                   help="steer on N train stimuli of a seeded shuffle (default: all)")
    p.add_argument("--eval-prompts", dest="n_eval_prompts", type=positive_int, default=None, metavar="N",
                   help="measure on the first N held-out stimuli (default: all)")
    p.add_argument("--no-answers", dest="with_answers", action="store_false",
                   help="read the train prompts alone, without the base model's greedy answers appended")
    p.add_argument("--answer-tokens", type=positive_int, default=d.answer_tokens,
                   help="length of the base's answers appended to the train prompts (default %(default)s)")
    p.add_argument("--max-new-tokens", type=positive_int, default=d.max_new_tokens,
                   help="length of the held-out generations (default %(default)s)")
    p.add_argument("--kl-weight", type=nonnegative_float, default=d.kl_weight,
                   help="weight of the target's KL to the base over the train dialogs (fluency; 0: the decoder's "
                        "loss alone; default %(default)s)")
    p.add_argument("--seed", type=int_arg, default=d.seed, help="LoRA init, prompt choice, row order")
    p.add_argument("--sample-seed", type=int_arg, default=d.sample_seed,
                   help="the sampling seed of both the steered and the unsteered generations")
    _checkpoint_arg(p, SteerConfig)
    p.add_argument("--json", action="store_true", help="steer.json's metrics, examples and losses as one JSON object")


def neurons_parsers(sub) -> None:
    np_ = sub.add_parser("neurons", help="explain MLP neurons: record, explain, simulate, score, view",
                         description="Neuron explanations (Bills et al. 2023), offline: record every MLP neuron over "
                                     "a corpus, explain each from its top records, simulate its activations from the "
                                     "explanation alone (all positions in one forward), score, and view. Every stage "
                                     "works in one run directory and resumes when rerun.")
    ns = np_.add_subparsers(dest="neurons_cmd", metavar="NEURONS_COMMAND", required=True, parser_class=Parser)
    p = _leaf(ns, "pipeline", help="every stage in one resumable run (--preset cpu: ~6 min on a 2-core CPU)",
              description="Record evenly spaced layers, explain many neurons with the token explainer and a seeded "
                          "few of them with the LM explainer, simulate (keyword; LM for the few), score and write "
                          "viewer.html, each stage resuming where a kill stopped it; timings.json holds each stage's "
                          "time. --preset cpu: 6 layers, 256 windows of 32 tokens, 50 neurons a layer by tokens, "
                          "4 by the LM (2 samples). --preset full: every layer and window, every neuron by tokens, "
                          "20 a layer by the LM (5 samples): a GPU's work.")
    _model_args(p)
    p.set_defaults(dtype="bfloat16")
    p.add_argument("--preset", default="cpu", choices=["cpu", "full"], help="(default cpu)")
    p.add_argument("--out", required=True, type=path_arg, help="run directory (created, or resumed)")
    p.add_argument("--corpus", default=PACKAGED, type=nonempty_text, metavar="FILE",
                   help=f"'{PACKAGED}' (default) or a text file or a .jsonl with a \"text\" field")
    p.add_argument("--seed", type=int_arg, default=0)
    p.add_argument("--json", action="store_true", help="the score summary as JSON")

    p = _leaf(ns, "record", help="record every neuron of the chosen layers over a corpus (resumable)",
              description="One batched forward per batch of windows captures every MLP neuron (mlp.I) of the chosen "
                          "layers; per neuron the top-k windows and a uniform random sample are kept.")
    _model_args(p)
    p.add_argument("--out", required=True, type=path_arg, help="run directory (created, or resumed)")
    p.add_argument("--corpus", default=PACKAGED, type=nonempty_text, metavar="FILE",
                   help=f"'{PACKAGED}' (default: the English prose this package ships) or a text file (documents "
                        "separated by blank lines) or a .jsonl with a \"text\" field")
    p.add_argument("--context", type=positive_int, default=64, help="tokens per record window (default 64)")
    p.add_argument("--max-windows", type=positive_int, default=None, help="record at most this many windows")
    p.add_argument("--layers", default="all", type=nonempty_text, help="'all' (default), 0,3,5 or 0-3")
    p.add_argument("--top-k", type=positive_int, default=RecordConfig.top_k)
    p.add_argument("--sample-k", type=positive_int, default=RecordConfig.sample_k, help="random records per neuron")
    p.add_argument("--batch-size", type=positive_int, default=RecordConfig.batch_size, help="windows per forward")
    p.add_argument("--seed", type=int_arg, default=RecordConfig.seed)
    _checkpoint_arg(p, RecordConfig)
    p.add_argument("--json", action="store_true", help="the run's description as JSON")

    p = _leaf(ns, "diff", help="the neurons a finetune moved: base vs base + a LoRA diff on neutral text (resumable)",
              description="Rank every neuron by its mean |activation shift| between the base and base + the diff "
                          "(a PEFT LoRA dir, or a diff of a zoo) over the corpus; write the --top of them to "
                          "moved.json and record the finetuned model into --out, ready for 'explain --moved'.")
    _model_args(p)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--peft", type=path_arg, metavar="DIR", help="a PEFT LoRA adapter directory")
    src.add_argument("--zoo", type=path_arg, help="a zoo (with --id)")
    p.add_argument("--id", default=None, metavar="DIFF_ID", type=nonempty_text, help="the zoo's diff")
    p.add_argument("--out", required=True, type=path_arg, help="run directory")
    p.add_argument("--top", type=positive_int, default=50, help="moved neurons kept (default 50)")
    p.add_argument("--corpus", default=PACKAGED, type=nonempty_text, metavar="FILE", help="the neutral text")
    p.add_argument("--context", type=positive_int, default=64)
    p.add_argument("--max-windows", type=positive_int, default=None)
    p.add_argument("--layers", default="all", type=nonempty_text)
    p.add_argument("--top-k", type=positive_int, default=RecordConfig.top_k)
    p.add_argument("--sample-k", type=positive_int, default=RecordConfig.sample_k)
    p.add_argument("--batch-size", type=positive_int, default=RecordConfig.batch_size)
    p.add_argument("--seed", type=int_arg, default=RecordConfig.seed)
    _checkpoint_arg(p, RecordConfig)
    p.add_argument("--json", action="store_true", help="the moved neurons as JSON")

    p = _leaf(ns, "explain", help="explain the recorded neurons (resumable)",
              description="Explain each neuron from its top records: --explainer tokens (no model: the tokens that "
                          "carry the activation) or lm (a local model samples --n-samples explanations in the "
                          "paper's prompt format). Each explainer's random-explanation baseline is written too.")
    _model_args(p)
    p.add_argument("--run", required=True, type=path_arg, help="a 'dit neurons record' directory")
    p.add_argument("--explainer", default="tokens", choices=["tokens", "lm"])
    p.add_argument("--per-layer", type=positive_int, default=None, help="explain N neurons per layer (seeded; default all)")
    p.add_argument("--n-samples", type=positive_int, default=5, help="explanations per neuron (lm; default 5)")
    p.add_argument("--max-new-tokens", type=positive_int, default=60, help="(lm; default 60)")
    p.add_argument("--temperature", type=nonnegative_float, default=1.0, help="(lm; default 1.0)")
    p.add_argument("--batch-size", type=positive_int, default=32, help="neurons per batch")
    p.add_argument("--moved", action="store_true",
                   help="explain the neurons of the run's moved.json only (a 'dit neurons diff' run)")
    p.add_argument("--seed", type=int_arg, default=0)
    _checkpoint_arg(p, RecordConfig)
    p.add_argument("--json", action="store_true")

    p = _leaf(ns, "simulate", help="simulate every explanation on its neuron's held-out records (resumable)",
              description="--simulator lm: a local model reads P('0'..'10') before every token's 'unknown', all "
                          "positions in one forward; --simulator keyword: 10 on the explanation's quoted tokens.")
    _model_args(p)
    p.add_argument("--run", required=True, type=path_arg)
    p.add_argument("--simulator", default="lm", choices=["lm", "keyword"])
    p.add_argument("--explainers", default=None, type=nonempty_text, metavar="NAME,...",
                   help="simulate these explainers' explanations only (default: all, baselines included)")
    p.add_argument("--batch-tokens", type=positive_int, default=8192, help="prompt tokens per forward")
    p.add_argument("--batch-size", type=positive_int, default=8, help="neurons per batch")
    _checkpoint_arg(p, RecordConfig)
    p.add_argument("--json", action="store_true")

    p = _leaf(ns, "score", help="score the simulations: pooled correlation, R^2, absolute deviation explained",
              description="Writes scores.jsonl (per neuron) and scores.json (per layer, with the best neurons).")
    p.add_argument("--run", required=True, type=path_arg)
    p.add_argument("--json", action="store_true", help="the summary as JSON")

    p = _leaf(ns, "view", help="write the run's neuron viewer (viewer.html)")
    p.add_argument("--run", required=True, type=path_arg)
    p.add_argument("--per-layer", type=positive_int, default=20, help="neurons shown per layer (default 20)")
    p.add_argument("--json", action="store_true")


def find_parsers(sub) -> None:
    fp = sub.add_parser("find", help="FIND: describe black-box functions, scored by the code an agent writes",
                        description="FIND (Schwettmann et al. 2023) offline: generate a seeded suite of numeric and "
                                    "string functions (and model-backed ones: neurons, weight diffs), run an agent "
                                    "on it (resumable), score its code in a sandbox, report per category; or all "
                                    "of it with 'dit find pipeline'.")
    fs = fp.add_subparsers(dest="find_cmd", metavar="FIND_COMMAND", required=True, parser_class=Parser)
    p = _leaf(fs, "pipeline", help="the whole benchmark in one resumable run (--preset cpu: 6 min on a 2-core CPU)",
              description="Record neurons of the model, generate the suite (numeric, string, those neurons, and "
                          "--zoo's diffs if given), run the search, reference, zero and lm agents, score each and "
                          "write report/, each stage resuming where a kill stopped it; timings.json holds each "
                          "stage's time. --preset cpu: 500 numeric + 500 string functions, 4 neurons from each of 6 "
                          "layers (256 windows of 32 tokens), the lm agent on 5 functions of each kind for 3 rounds. "
                          "--preset full: neurons from every layer (20 each) over the whole corpus, the lm agent on "
                          "every function for 5 rounds: a GPU's work.")
    _model_args(p)
    p.set_defaults(dtype="bfloat16")
    p.add_argument("--preset", default="cpu", choices=["cpu", "full"], help="(default cpu)")
    p.add_argument("--out", required=True, type=path_arg, help="run directory (created, or resumed)")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--corpus", default=PACKAGED, type=nonempty_text, metavar="FILE",
                   help=f"the text neurons are recorded over ('{PACKAGED}', the default, or a text file)")
    p.add_argument("--zoo", type=path_arg, default=None, help="also every diff of this zoo (category model/diff)")
    p.add_argument("--zoo-split", default=None, type=nonempty_text, metavar="SPLIT", help="only this split of --zoo")
    p.add_argument("--task", default="hidden-topic", choices=["hidden-topic", "news"], help="--zoo's task (labels)")
    p.add_argument("--json", action="store_true", help="every agent's score summary as JSON")

    p = _leaf(fs, "generate", help="write a seeded FIND suite (JSONL)",
              description="Numeric functions (16 primitive families, sums, products, noise, corruption on an "
                          "interval, small-MLP approximations) and string functions (compositions of primitives), "
                          "each with its description, domain and reference code.")
    p.add_argument("--seed", type=nonnegative_int, default=0)
    p.add_argument("--n-numeric", type=nonnegative_int, default=500)
    p.add_argument("--n-string", type=nonnegative_int, default=500)
    p.add_argument("--zoo", type=path_arg, default=None,
                   help="also every diff of this zoo as a model-backed function (category model/diff): f(prompt) -> "
                        "the finetuned model's answer, scored by retrieval of its label")
    p.add_argument("--zoo-split", default=None, type=nonempty_text, metavar="SPLIT", help="only this split of --zoo")
    p.add_argument("--task", default="hidden-topic", choices=["hidden-topic", "news"], help="--zoo's task (labels)")
    p.add_argument("--neurons", type=path_arg, default=None, metavar="RECORD_RUN",
                   help="also neurons of this 'dit neurons record' run (category model/neuron): f(text) -> the "
                        "neuron's max activation, scored by simulating the description on held-out records")
    p.add_argument("--neurons-per-layer", type=positive_int, default=4, help="neurons of each recorded layer (4)")
    p.add_argument("--neuron-min-reference", type=nonnegative_float, default=FIND_MIN_REFERENCE,
                   help="correlation a neuron's ground truth (its token explanation) needs on its held-out records "
                        "to enter the suite (default %(default)s)")
    p.add_argument("--out", required=True, type=path_arg, help="suite file to write (JSONL)")
    p.add_argument("--json", action="store_true", help="print the counts per category as JSON")

    p = _leaf(fs, "run", help="run an agent over a suite (resumable: rerun the same command to continue)",
              description="Agents: search (probing + least squares over the primitive families; composition "
                          "search for strings; the firing words of a neuron by word prefixes of probe snippets; "
                          "three fixed questions to a diff), lm (a local language model in FIND's call-and-describe "
                          "loop), reference (the ground truth), zero (a constant 0 / empty string). A suite with "
                          "neurons or diffs needs --model (the recorded model, the zoo's base).")
    p.add_argument("--suite", required=True, type=path_arg)
    p.add_argument("--agent", required=True, choices=FIND_AGENTS)
    p.add_argument("--out", required=True, type=path_arg, help="run directory (created, or resumed)")
    p.add_argument("--limit", type=positive_int, default=None,
                   help="only the first N functions of each kind (numeric, string, diff, neuron)")
    p.add_argument("--n-probes", type=positive_int, default=None, help="search agent: inputs in its sweep (200)")
    p.add_argument("--probe-corpus", default=None, type=nonempty_text, metavar="FILE",
                   help="search agent: the texts it probes neurons with ('packaged', the default, or a text file)")
    p.add_argument("--rounds", type=nonnegative_int, default=None, help="lm agent: rounds of calls (5)")
    p.add_argument("--calls-per-round", type=positive_int, default=None, help="lm agent: inputs per round (8)")
    p.add_argument("--max-new-tokens", type=positive_int, default=None, help="lm agent: tokens per turn (160)")
    p.add_argument("--batch-size", type=positive_int, default=None, help="lm agent: conversations per batch (32)")
    _model_args(p)
    p.add_argument("--json", action="store_true", help="print the run header as JSON")

    p = _leaf(fs, "score", help="score a run's code in the sandbox (writes scores.jsonl and summary.json)")
    p.add_argument("--suite", required=True, type=path_arg)
    p.add_argument("--run", required=True, type=path_arg, help="a 'dit find run' directory")
    p.add_argument("--timeout-s", type=positive_float, default=10.0, help="wall-clock limit per function's code")
    p.add_argument("--memory-mb", type=positive_int, default=512, help="memory the code may use")
    p.add_argument("--json", action="store_true")

    p = _leaf(fs, "report", help="report scored runs side by side (report.html, report.md, charts)")
    p.add_argument("--suite", required=True, type=path_arg)
    p.add_argument("--run", action="append", required=True, type=path_arg, help="a scored run directory (repeatable)")
    p.add_argument("--out", required=True, type=path_arg, help="report directory")
    p.add_argument("--json", action="store_true", help="print every run's summary as JSON")

    p = _leaf(fs, "diffs", help="describe a zoo's weight diffs by probing them; scored by label retrieval next to DIT",
              description="Each diff is a black box f(prompt) -> the adapted model's answer (or, --mode kl, how far "
                          "it moves the base's next token). Agents: ask (fixed questions to the diff), lm (the "
                          "call-and-describe loop on --model). Descriptions are scored by retrieval of the diff's "
                          "label among the task's labels; --dit-results adds each method of a 'dit interpret' "
                          "results file on the same diffs.")
    p.add_argument("--zoo", required=True, type=path_arg)
    p.add_argument("--agent", required=True, choices=FIND_DIFF_AGENTS)
    p.add_argument("--out", required=True, type=path_arg, help="output directory (answers.jsonl, diffs.json)")
    p.add_argument("--task", default="hidden-topic", choices=sorted(TASKS))
    p.add_argument("--split", default=None, type=nonempty_text, help="only this split of the zoo (e.g. test)")
    p.add_argument("--limit", type=positive_int, default=None, help="only the first N diffs")
    p.add_argument("--mode", default="text", choices=["text", "kl"], help="what the lm agent's calls return")
    p.add_argument("--rounds", type=nonnegative_int, default=3, help="lm agent: rounds of calls")
    p.add_argument("--max-new-tokens", type=positive_int, default=32, help="tokens per answer of the diffed model")
    p.add_argument("--dit-results", type=path_arg, default=None, metavar="RESULTS_JSONL",
                   help="a 'dit interpret' results file: its methods scored on the same diffs")
    _model_args(p)
    p.add_argument("--json", action="store_true")
