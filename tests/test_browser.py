"""The pages people look at, rendered in a real browser (headless Chromium): the DIT report that
``dit evaluate`` writes and the neuron viewer that ``dit neurons view`` writes, each typed as a user
types it. The DOM Chromium builds (after its own parsing) must hold what the page's data says, and
its screenshot must show the page: not blank, with the charts' bars and the activation shading
drawn in their colours.

Chromium is the Debian package ``chromium`` (``.ci/run`` installs it where missing). Without it these
tests skip, except under CI (``CI`` set), where a missing browser fails them.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from test_neurons_world import planted_record_run

from dit_engine.charts import PALETTE
from dit_engine.cli import main
from dit_engine.neurons.explain import TokenExplainer
from dit_engine.neurons.run import explain_run, score_run, simulate_run
from dit_engine.neurons.simulate import KeywordSimulator

WIDTH, HEIGHT = 1200, 1600
TOPICS = Path(__file__).resolve().parents[1] / "dit_engine" / "tasks" / "data" / "topics.json"


def _chromium() -> str:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if path := shutil.which(name):
            return path
    if os.environ.get("CI"):
        pytest.fail("headless Chromium is missing under CI: .ci/run installs the Debian package chromium")
    pytest.skip("headless Chromium not installed (Debian package chromium)")


def _render(page: Path, tmp: Path) -> tuple[str, np.ndarray]:
    """(the DOM after Chromium parsed and laid out the page, its screenshot as [H, W, 3] uint8)."""
    from PIL import Image

    browser = _chromium()
    common = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars", "--no-first-run",
              f"--user-data-dir={tmp / 'profile'}", f"--window-size={WIDTH},{HEIGHT}"]
    url = page.resolve().as_uri()
    dom = subprocess.run([*common, "--dump-dom", url], capture_output=True, text=True, timeout=120, check=True).stdout
    shot = tmp / "shot.png"
    subprocess.run([*common, f"--screenshot={shot}", url], capture_output=True, timeout=120, check=True)
    with Image.open(shot) as im:
        pixels = np.asarray(im.convert("RGB"))
    return dom, pixels


def _assert_not_blank(pixels: np.ndarray) -> None:
    assert pixels.shape == (HEIGHT, WIDTH, 3)
    background = np.all(pixels >= 250, axis=-1)
    assert background.mean() < 0.97, "the screenshot is (nearly) all white"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # text is anti-aliased: many shades


def _colour_pixels(pixels: np.ndarray, hex_colour: str, tol: int = 6) -> int:
    rgb = np.array([int(hex_colour[i:i + 2], 16) for i in (1, 3, 5)])
    return int(np.all(np.abs(pixels.astype(int) - rgb) <= tol, axis=-1).sum())


class Dom(HTMLParser):
    """Table rows (cell texts), SVG bars, and neuron sections with their token spans, as parsed."""

    def __init__(self):
        super().__init__()
        self.rows, self.bars, self.neurons, self.title = [], [], [], ""
        self._cell = self._tok = None
        self._in_title = False

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "tr":
            self.rows.append([])
        elif tag in ("td", "th"):
            self._cell = ""
        elif tag == "rect" and a.get("class") == "bar":
            self.bars.append(a)
        elif tag == "section" and a.get("class") == "neuron":
            self.neurons.append({"layer": int(a["data-layer"]), "neuron": int(a["data-neuron"]), "tokens": []})
        elif tag == "span" and a.get("class") == "tok":
            self._tok = ""
        elif tag == "title" and not self.title:  # the page's, not the charts' SVG titles
            self._in_title = True

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data
        if self._tok is not None:
            self._tok += data
        if self._in_title:
            self.title += data

    def handle_endtag(self, tag):
        if tag in ("td", "th") and self._cell is not None:
            self.rows[-1].append(" ".join(self._cell.split()))
            self._cell = None
        elif tag == "span" and self._tok is not None:
            self.neurons[-1]["tokens"].append(self._tok)
            self._tok = None
        elif tag == "title":
            self._in_title = False


def _dom(text: str) -> Dom:
    d = Dom()
    d.feed(text)
    return d


def _result(id_, method, topic, category, answer):
    return {"id": id_, "method": method, "labels": {"topic": topic, "category": category}, "label_key": "topic",
            "answer": answer, "rank": 4, "split": "test"}


def test_the_dit_report_renders_its_tables_and_bars(tmp_path):
    topics = [(t["name"], t["category"]) for t in json.loads(TOPICS.read_text())["topics"]
              if t["split"] == "test"][:4]
    rows = []
    for i, (topic, cat) in enumerate(topics):
        rows.append(_result(f"d{i}", "dit", topic, cat, topic if i < 3 else "the weather"))
        rows.append(_result(f"d{i}", "base", topic, cat, "I am a helpful assistant"))
    results = tmp_path / "results.jsonl"
    results.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["evaluate", str(results), "--out", str(tmp_path / "report"), "--title", "Browser check"]) == 0

    dom_text, pixels = _render(tmp_path / "report" / "report.html", tmp_path)
    dom = _dom(dom_text)
    metrics = json.loads((tmp_path / "report" / "metrics.json").read_text())
    assert dom.title == "Browser check"
    overall = {r[0]: r for r in dom.rows if r and r[0] in ("dit", "base")}
    for method in ("dit", "base"):
        em = metrics["methods"][method]["overall"]["exact_match"]
        assert overall[method][1] == "4" and overall[method][2].startswith(f"{em:.3f}")
    assert metrics["methods"]["dit"]["overall"]["exact_match"] == 0.75  # 3 of 4, the data above
    assert {b["data-method"] for b in dom.bars} == {"dit", "base"} and len(dom.bars) >= 10

    _assert_not_blank(pixels)
    # DIT's bars are drawn in the first palette colour; base scores 0 everywhere (no bar area).
    assert _colour_pixels(pixels, PALETTE[0]) > 2000


@pytest.fixture(scope="module")
def neuron_run(tmp_path_factory):
    _, run = planted_record_run(tmp_path_factory.mktemp("browser-neurons"), sentences=100, seed=2, top_k=6, sample_k=4)
    explain_run(run, TokenExplainer(), progress=False)
    simulate_run(run, KeywordSimulator(), progress=False)
    score_run(run)
    return run


def test_the_neuron_viewer_renders_every_neuron_with_shaded_tokens(neuron_run, tmp_path):
    assert main(["neurons", "view", "--run", str(neuron_run), "--per-layer", "2"]) == 0
    dom_text, pixels = _render(neuron_run / "viewer.html", tmp_path)
    dom = _dom(dom_text)
    records = json.loads((neuron_run / "records.json").read_text())
    assert len(dom.neurons) == 2 * len(records["layers"])
    assert {n["layer"] for n in dom.neurons} == set(records["layers"])
    for n in dom.neurons:  # each section kept its records' tokens through the browser's parse
        assert len(n["tokens"]) >= 16

    _assert_not_blank(pixels)
    # Tokens are shaded rgba(255, 120, 0, a) over white: orange tints, (255, 255 - 135a, 255 - 255a).
    r, g, b = (pixels[..., i].astype(int) for i in range(3))
    tinted = (r >= 250) & (b <= 200) & (g > b) & (g - b >= 40)
    assert tinted.sum() > 500
