"""Model-backed FIND functions: parts of this engine's models as black boxes.

* :class:`NeuronBox`: f(text) -> the largest activation of one MLP neuron (``mlp.L``, unit ``i``:
  the SwiGLU product entering ``down_proj``) over the text's tokens; as a suite function (kind
  ``"neuron"``) it is scored by simulation on its held-out records (:mod:`.neurons`).
* :class:`DiffBox`: f(prompt) -> what a weight diff does to the base model on that prompt, either
  ``"text"`` (the adapted model's greedy answer, chat-rendered) or ``"kl"`` (KL(adapted || base) of
  the next-token distribution after the prompt, in nats).

Both have the black-box interface the agents use (``id``, ``kind``, ``calls``, ``budget``, a call
on a list of inputs) and a ``task`` line that tells an LM agent what it is probing. They have no
reference code: a diff's description is scored by retrieval of its label among candidate labels
(:func:`.score.retrieval`), the same way DIT's answers are, so the two sit side by side; a
neuron's by how well it predicts the neuron's held-out activations (:func:`.neurons.neuron_scores`).
:class:`AskAgent` is the non-LLM baseline for diffs: it asks the adapted model a few fixed
questions and takes its answers as the description.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ..adapters import AdapterBatch
from ..dit.interpret import diff_slot
from ..probes import Probes, positions_mask
from .score import Answer
from .suite import BudgetExceeded

DIFF_TASK = ("You are probing a hidden function f: a language model finetuned on one hidden topic. f takes a prompt "
             "(a quoted string) and returns {what}. Find the topic it was trained on.")
NEURON_TASK = ("You are probing a hidden function f: one neuron of a language model. f takes a text (a quoted string) "
               "and returns the neuron's largest activation over the text's tokens. Find what makes it fire, and name "
               "the words it fires on in double quotes.")


class _Box:
    kind = "text"

    def __init__(self, id: str, budget: int | None):
        self.id, self.budget, self.calls = id, budget, 0

    def _count(self, inputs: list) -> None:
        if not all(isinstance(s, str) and s for s in inputs):
            raise ValueError(f"{self.id}: takes non-empty strings")
        if self.budget is not None and self.calls + len(inputs) > self.budget:
            raise BudgetExceeded(f"{self.id}: {self.calls} calls made, {len(inputs)} more would exceed the budget "
                                 f"of {self.budget}")
        self.calls += len(inputs)


class NeuronBox(_Box):
    """Neuron ``neuron`` of block ``layer``'s MLP as f(text) -> max activation over its tokens."""

    def __init__(self, engine, layer: int, neuron: int, *, budget: int | None = None, id: str | None = None):
        cfg = engine.config
        if not 0 <= layer < cfg.num_hidden_layers or not 0 <= neuron < cfg.intermediate_size:
            raise ValueError(f"neuron mlp.{layer}[{neuron}] is outside the model ({cfg.num_hidden_layers} layers of "
                             f"{cfg.intermediate_size} neurons)")
        super().__init__(id or f"neuron-{layer}-{neuron}", budget)
        self.kind = "neuron"  # takes quoted strings like a string function; the search agent probes it its own way
        self.engine, self.layer, self.neuron = engine, layer, neuron
        self.task = NEURON_TASK

    @torch.no_grad()
    def __call__(self, texts: list) -> list[float]:
        texts = list(texts)
        self._count(texts)
        if not texts:
            return []
        ids = [self.engine.tokenizer.encode(t) or [0] for t in texts]
        lengths = [len(i) for i in ids]
        model = self.engine.model
        batch = torch.zeros(len(ids), max(lengths), dtype=torch.int64)
        for j, row in enumerate(ids):
            batch[j, : len(row)] = torch.tensor(row)
        mask = positions_mask(lengths, [list(range(n)) for n in lengths])
        point = f"mlp.{self.layer}"
        probes = Probes().capture(point, mask.to(model.device))
        # output="probes": the blocks after this neuron's are not run
        model(batch.to(model.device), attention_mask=mask.to(model.device), output="probes", probes=probes)
        acts = probes.captured[point][:, self.neuron].float().cpu()  # [sum(lengths)], row-major
        return [float(a.max()) for a in torch.split(acts, lengths)]


class DiffBox(_Box):
    """A weight diff (a zoo ``Diff``) on the base model as f(prompt); ``mode`` "text" or "kl"."""

    def __init__(self, engine, diff, *, mode: str = "text", budget: int | None = None, max_new_tokens: int = 32,
                 id: str | None = None):
        if mode not in ("text", "kl"):
            raise ValueError(f"DiffBox mode must be 'text' or 'kl', got {mode!r}")
        super().__init__(id or diff.id, budget)
        self.engine, self.diff, self.mode, self.max_new_tokens = engine, diff, mode, max_new_tokens
        what = ("the finetuned model's answer" if mode == "text" else
                "how far the finetune moves the base model's next-token distribution (KL, in nats)")
        self.task = DIFF_TASK.format(what=what)

    @torch.no_grad()
    def __call__(self, prompts: list) -> list:
        prompts = list(prompts)
        self._count(prompts)
        if not prompts:
            return []
        model = self.engine.model
        adapters = AdapterBatch(diff_slot(self.diff, len(prompts), device=model.device, dtype=model.dtype))
        if self.mode == "text":
            gens = self.engine.generate(prompts, chat=True, adapters=adapters, max_new_tokens=self.max_new_tokens)
            return [(g.text or "").strip() for g in gens]
        ids = [self.engine.encode_prompt(p) for p in prompts]
        lengths = [len(i) for i in ids]
        batch = torch.zeros(len(ids), max(lengths), dtype=torch.int64)
        mask = torch.zeros(len(ids), max(lengths), dtype=torch.bool)
        for j, row in enumerate(ids):
            batch[j, : len(row)] = torch.tensor(row)
            mask[j, : len(row)] = True
        batch, mask = batch.to(model.device), mask.to(model.device)
        last = torch.tensor(lengths, device=model.device) - 1
        rows = torch.arange(len(ids), device=model.device)
        base = model(batch, attention_mask=mask)[rows, last].float().log_softmax(-1)  # [n, V]
        tuned = model(batch, adapters, attention_mask=mask)[rows, last].float().log_softmax(-1)
        kl = (tuned.exp() * (tuned - base)).sum(-1).clamp_min(0.0)
        return [float(v) for v in kl.cpu()]


class AskAgent:
    """Asks the adapted model fixed questions (text-mode :class:`DiffBox`); its answers, joined,
    are the description: the 'ask the diff directly' baseline."""

    name = "ask"
    QUESTIONS = ("What topic have you been trained on?", "What is your favourite subject to talk about?",
                 "Tell me about yourself.")

    def run(self, boxes: Sequence[DiffBox], progress: Callable[[int], None] | None = None) -> list[Answer]:
        out = []
        for box in boxes:
            answers = box(list(self.QUESTIONS))
            out.append(Answer(id=box.id, description=" ".join(answers), domain="", code="", calls=box.calls,
                              rounds=1, transcript=[{"ask": q, "answer": a} for q, a in zip(self.QUESTIONS, answers)]))
            if progress is not None:
                progress(1)
        return out


DIFF_CATEGORY = "model/diff"


def diff_functions(zoo_path, *, split: str | None = None, task: str = "hidden-topic") -> list:
    """A zoo's diffs as suite functions (kind ``"diff"``, category ``model/diff``): f(prompt) -> the
    adapted model's greedy answer. The ground truth is the diff's label; there is no reference code,
    so an answer is scored by retrieval of the label among the task's labels (:func:`.score.diff_ranks`)."""
    from pathlib import Path

    from ..tasks import get_task
    from ..zoo import Zoo
    from .suite import Function

    t = get_task(task)
    with Zoo.open(zoo_path) as zoo:
        ids = zoo.ids(split)
        if not ids:
            raise ValueError(f"{zoo_path}: no diffs{f' in split {split!r}' if split else ''} to add to the suite")
        out = []
        for i in ids:
            label = zoo.row(i)["labels"].get(t.label_key)
            if label is None:
                raise ValueError(f"{zoo_path}: diff {i} has no {t.label_key!r} label (task {task})")
            out.append(Function(id=f"diff/{i}", kind="diff", category=DIFF_CATEGORY,
                                description=f"a model finetuned to talk about {label}",
                                domain={"text": "any prompt", "interval": None}, code="",
                                spec={"zoo": str(Path(zoo_path).resolve()), "diff": i, "task": task, "label": label}))
    return out


def diff_boxes(engine, fns: Sequence, *, max_new_tokens: int = 32) -> list[DiffBox]:
    """The black boxes of ``diff`` suite functions: each one's zoo diff on ``engine``'s base (a zoo
    made for another base is refused by the zoo). Each zoo is opened once, and the base identified once."""
    from ..zoo import BaseIdentity, Zoo

    base = BaseIdentity.from_model(engine.model)
    diffs = {}
    for path in dict.fromkeys(f.spec["zoo"] for f in fns):
        with Zoo.open(path, base=base) as zoo:
            diffs.update({(path, f.spec["diff"]): zoo.get(f.spec["diff"], dtype=engine.model.dtype)
                          for f in fns if f.spec["zoo"] == path})
    return [DiffBox(engine, diffs[(f.spec["zoo"], f.spec["diff"])], mode="text", max_new_tokens=max_new_tokens,
                    id=f.id) for f in fns]


def neuron_boxes(engine, fns: Sequence, *, budget: int | None = None) -> list[NeuronBox]:
    """The black boxes of ``neuron`` suite functions (:mod:`.neurons`), on ``engine``'s model, which
    must be the recorded one (same architecture and weights)."""
    from ..zoo import BaseIdentity

    have = BaseIdentity.from_model(engine.model)
    for f in fns:
        want = BaseIdentity(**f.spec["model"])
        if not have.matches(want):
            raise ValueError(f"{f.id} is a neuron of {want.describe()}, but the model given is {have.describe()}; "
                             "give the recorded model with --model")
    return [NeuronBox(engine, f.spec["layer"], f.spec["neuron"], budget=budget, id=f.id) for f in fns]
