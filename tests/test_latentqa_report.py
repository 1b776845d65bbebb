"""The LatentQA report shows what the evaluation measured: its numbers in every file, its intervals
as error bars, chance as a line, the decoder's losses per epoch; bad input is one clear error."""

from __future__ import annotations

import json
import re

import pytest

from dit_engine.latentqa.dialogs import LatentQAError
from dit_engine.latentqa.report import write_latentqa_report


def _result() -> dict:
    def cond(r1, r5, mrr):
        return {"retrieval@1": r1, "retrieval@5": r5, "mrr": mrr, "retrieval@1_ci": [r1 / 2, min(1.0, r1 * 1.5)],
                "retrieval@5_ci": [r5 / 2, r5], "mrr_ci": [mrr / 2, min(1.0, mrr * 1.2)]}

    return {
        "question": "Who is the assistant pretending to be?", "n_dialogs": 8, "n_personas": 4,
        "chance": {"retrieval@1": 0.25, "retrieval@5": 1.0, "mrr": 0.52},
        "conditions": {"decoder": cond(0.75, 1.0, 0.85), "zero": cond(0.25, 1.0, 0.5),
                       "shuffled": cond(0.125, 1.0, 0.4), "untrained": cond(0.375, 1.0, 0.6)},
        "decoder_minus": {c: {"retrieval@1": d, "retrieval@5": 0.0, "mrr": d / 2, "retrieval@1_ci": [d - 0.1, d + 0.1],
                              "retrieval@5_ci": [0.0, 0.0], "mrr_ci": [0.0, d]}
                          for c, d in (("zero", 0.5), ("shuffled", 0.625), ("untrained", 0.375))},
        "answers": [{"persona": "sea-captain", "label": "a retired sea captain", "stimulus": "Hi | there",
                     "answer": "A sea captain.", "names_persona": True},
                    {"persona": "chef", "label": "a chef", "stimulus": "Hello", "answer": "A <b>pilot</b>.",
                     "names_persona": False}],
        "answers_name_persona": 0.5,
        "uncalibrated": {"decoder": cond(0.25, 0.5, 0.4), "zero": cond(0.25, 1.0, 0.5)},
    }


RECIPE = {"config": {"rank": 16, "alpha": 32.0, "lr": 1e-4, "epochs": 2, "batch_size": 8},
          "epochs": [{"epoch": 0, "train_loss": 3.2, "held_out_loss": 3.5}, {"epoch": 1, "train_loss": 2.1,
                                                                              "held_out_loss": 2.9}],
          "read_at": "hidden.15", "write_at": "hidden.1", "examples": {"train": 920, "test": 232}}
MADE = {"machine": "Test CPU, 2 cores", "commit": "0123456789abcdef", "dirty": False, "date": "2026-12-01T10:00:00"}


def _bars(svg: str) -> dict[str, float]:
    return {m: float(v) for m, v in re.findall(r'class="bar" data-method="([^"]+)" data-value="([^"]+)"', svg)}


def test_every_file_carries_the_measured_numbers(tmp_path):
    res = _result()
    html = write_latentqa_report(res, tmp_path / "rep", recipe=RECIPE, provenance=MADE)
    rep = tmp_path / "rep"
    assert html == rep / "report.html"
    metrics = json.loads((rep / "metrics.json").read_text())
    assert {k: metrics[k] for k in res} == res and metrics["recipe"] == RECIPE and metrics["provenance"] == MADE
    svg = (rep / "charts" / "conditions_retrieval_at_1.svg").read_text()
    assert _bars(svg) == {c: m["retrieval@1"] for c, m in res["conditions"].items()}
    cis = dict((m, (float(lo), float(hi))) for m, lo, hi in
               re.findall(r'class="ci" data-method="([^"]+)" data-lo="([^"]+)" data-hi="([^"]+)"', svg))
    assert cis == {c: tuple(m["retrieval@1_ci"]) for c, m in res["conditions"].items()}
    assert 'class="chance" data-value="0.250000"' in svg
    assert _bars((rep / "charts" / "conditions_mrr.svg").read_text())["decoder"] == 0.85
    loss = (rep / "charts" / "decoder_loss.svg").read_text()
    points = re.findall(r'class="point" data-series="([^"]+)" data-value="([^"]+)"', loss)
    assert [(s, float(v)) for s, v in points] == [("train loss", 3.2), ("train loss", 2.1), ("held-out loss", 3.5),
                                                 ("held-out loss", 2.9)]
    md = (rep / "report.md").read_text()
    assert "Measured on Test CPU, 2 cores, commit 0123456789ab, 2026-12-01T10:00:00." in md
    assert "| decoder | 0.750 [0.38, 1.00] | 1.000 [0.50, 1.00] | 0.850 [0.42, 1.00] |" in md
    assert "| decoder - shuffled | +0.625 [+0.53, +0.72] | +0.312 [+0.00, +0.62] |" in md
    assert "| 2 | 2.1000 | 2.9000 |" in md and "Generated answers naming the persona: 1/2." in md
    assert "## Uncalibrated scores" in md and "| decoder | 0.250 [0.12, 0.38] | 0.500 [0.25, 0.50] |" in md
    assert "Hi \\| there" in md  # a table cell keeps its pipe escaped
    page = html.read_text()
    assert page.count("<svg") == 3 and "A &lt;b&gt;pilot&lt;/b&gt;." in page and "<b>pilot</b>" not in page


def test_no_epochs_no_loss_chart_and_no_recipe_section(tmp_path):
    write_latentqa_report(_result(), tmp_path)
    assert sorted(p.name for p in (tmp_path / "charts").iterdir()) == ["conditions_mrr.svg",
                                                                      "conditions_retrieval_at_1.svg"]
    md = (tmp_path / "report.md").read_text()
    assert "## Decoder training" not in md and "## Decoder\n" not in md and "Measured on" not in md


def test_a_result_without_the_decoder_is_refused(tmp_path):
    res = _result()
    del res["conditions"]["decoder"]
    with pytest.raises(LatentQAError, match="no 'decoder' condition"):
        write_latentqa_report(res, tmp_path / "rep")
    assert not (tmp_path / "rep").exists()
