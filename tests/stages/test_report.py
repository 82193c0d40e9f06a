"""cogvx report: a self-contained page, checked in a real headless browser (Debian's chromium)."""

from __future__ import annotations

import json
import re
import shutil
from collections import Counter
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cogvx import runs
from cogvx.cli import app
from cogvx.pages import line_chart
from cogvx.report import ReportConfig
from cogvx.report import run as write_report
from cogvx.shards import Manifest, read_shard
from tests.conftest import CLIPS
from tests.helpers.browser import Elements, KeyValueTables, dump_dom
from tests.helpers.runfolders import PROMPTS, make_validation, train_lora


def smoothed(values: list[float], weight: float = 0.9) -> float:
    """TensorBoard's bias-corrected exponential moving average, last value."""
    acc = norm = 0.0
    for value in values:
        acc, norm = weight * acc + (1 - weight) * value, weight * norm + (1 - weight)
    return acc / norm


@pytest.fixture(scope="module")
def trained_run(tiny_cache: Path, tmp_path_factory) -> Path:
    return train_lora(tiny_cache, tmp_path_factory.mktemp("report") / "run", steps=4)


def test_report_shows_curves_and_the_video_grid_in_a_browser(trained_run: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    make_validation(run, steps=(2, 4))  # 2 prompts x 2 steps, not rendered yet

    out = CliRunner().invoke(app, ["report", str(run)])
    assert out.exit_code == 0, out.output
    page = run / "report.html"
    text = page.read_text()
    assert not re.search(r"(https?:)?//[a-z]", text), "the page must not reach the network"
    # The report rendered the videos it shows.
    assert all((run / "validation" / f"step-{s:06d}" / f"sample-{k:02d}.mp4").is_file() for s in (2, 4) for k in (0, 1))

    dom = Elements(dump_dom(page))
    body = dom.find("body")[0]
    assert body.get("data-ready") == "1", "the page's script did not finish"
    assert json.loads(body["data-errors"]) == [], body["data-errors"]

    cells = dom.find("td", class_=r"\bcell\b")
    assert len(cells) == len(PROMPTS) * 2
    videos = dom.find("video")
    assert len(videos) == 4
    # Every video was found and decoded by the browser: its real frame size came back.
    assert [v.get("data-size") for v in videos] == ["64x32"] * 4
    assert sorted((c["data-step"], c["data-sample"]) for c in cells) == [
        ("2", "0"), ("2", "1"), ("4", "0"), ("4", "1")
    ]  # fmt: skip
    assert [v["src"] for v in videos][:2] == [
        "validation/step-000002/sample-00.mp4", "validation/step-000004/sample-00.mp4"
    ]  # fmt: skip
    headers = [a for t, a in dom.tags if t == "th" and "step" in a.get("class", "")]
    assert len(headers) == 2

    # Prompts are shown as text, never as markup.
    assert PROMPTS[1] in "".join(dom.text)
    assert not dom.find("b")
    # Curves: loss (raw and smoothed), learning rate, gradient norm; with 4 metric lines each.
    lines = dom.find("polyline")
    assert {line["class"] for line in lines} == {"raw", "smooth", "lr", "gn"}
    assert all(len(line["points"].split()) == 4 for line in lines)
    # The data summary comes from the cache manifest: the six bundled clips, in three frame buckets.
    _, data, _ = KeyValueTables(dump_dom(page)).tables
    assert data["samples"] == "6" and data["buckets (frames x h x w)"] == "13x64x96: 2, 17x64x96: 2, 21x64x96: 2"


def test_report_puts_the_runs_and_the_caches_values_in_their_rows(trained_run: Path, tiny_cache: Path, tmp_path):
    page = tmp_path / "page.html"
    write_report(ReportConfig(trained_run, output=page, render=False))
    summary, data, config = KeyValueTables(page.read_text()).tables

    losses = [json.loads(line)["loss"] for line in (trained_run / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 4
    assert summary["base model"] == "tiny"
    assert summary["steps trained"] == "4 of 4"
    assert summary["final loss (EMA 0.9 of 4 step losses)"] == f"{smoothed(losses):.4g}"
    assert summary["last step's loss"] == f"{losses[-1]:.4g}"
    assert summary["LoRA"] == "rank 4, alpha 128.0, on to_q, to_k, to_v, to_out.0"

    manifest = Manifest.load(tiny_cache)
    assert data["cache"] == str(tiny_cache.resolve())
    assert data["encoded with"] == "tiny"
    assert data["samples"] == "6"  # the six bundled clips, one window each
    assert data["shards"] == str(len(manifest.shards))
    assert data["size on disk"] == f"{manifest.total_bytes / 2**20:.1f} MiB"
    # Buckets as the samples themselves record them, read from the shards.
    samples = [s for record in manifest.shards for s in read_shard(tiny_cache, record)]
    buckets = Counter(s.meta["bucket"] for s in samples)
    assert len(samples) == 6 and len(buckets) > 1
    assert data["buckets (frames x h x w)"] == ", ".join(f"{b}: {n}" for b, n in sorted(buckets.items()))
    assert sorted(data["sources"].split(", ")) == sorted(p.name for p in CLIPS.glob("*.mp4"))
    for key, value in manifest.params.items():
        assert data[key] == (", ".join(map(str, value)) if isinstance(value, list) else str(value)), key

    assert (config["model"], config["rank"], config["alpha"], config["max_steps"]) == ("tiny", "4", "128.0", "4")
    assert config["targets"] == "to_q, to_k, to_v, to_out.0"


def test_report_of_a_run_without_validation_says_how_to_get_videos(trained_run: Path, tmp_path: Path):
    page = tmp_path / "elsewhere" / "page.html"
    result = write_report(ReportConfig(trained_run, output=page))
    assert result.metrics == 4 and result.cells == 0 and "no validation latents" in result.notes
    dom = Elements(dump_dom(page))
    body = dom.find("body")[0]
    assert body.get("data-ready") == "1" and json.loads(body["data-errors"]) == []
    assert dom.find("p", id="no-validation")
    text = "".join(dom.text)
    assert "--validation-every" in text and "--validation-prompt" in text
    assert not dom.find("video")


def test_report_records_a_missing_video_as_an_error(trained_run: Path, tmp_path: Path):
    """The browser check is not vacuous: a video that cannot load shows up in data-errors."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    make_validation(run, steps=(2,), prompts=PROMPTS[:1])
    write_report(ReportConfig(run))
    (run / "validation" / "step-000002" / "sample-00.mp4").unlink()
    dom = Elements(dump_dom(run / "report.html"))
    errors = json.loads(dom.find("body")[0]["data-errors"])
    assert len(errors) == 1 and "sample-00.mp4" in errors[0]


def test_report_without_render_marks_cells_and_skips_metrics_garbage(trained_run: Path, tmp_path: Path):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    make_validation(run, steps=(3,), prompts=PROMPTS[:1])
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "loss": 0.')  # a run killed mid-line
    result = write_report(ReportConfig(run, render=False))
    assert result.cells == 1 and not result.rendered and result.metrics == 4
    text = (run / "report.html").read_text()
    assert "not rendered: run cogvx render" in text and "1 unreadable line" in text
    assert not (run / "validation" / "step-000003" / "sample-00.mp4").exists()


def test_line_chart_handles_single_points_and_non_finite_values():
    one = line_chart("loss", [1.0], [("loss", [0.5], "raw")])
    assert "<circle" in one and "<polyline" not in one
    gaps = line_chart("loss", [1.0, 2.0, 3.0], [("loss", [0.5, float("nan"), 0.25], "raw")])
    assert gaps.count("<polyline") == 1 and "nan" not in gaps.lower().replace("no finite", "")
    assert "no finite values" in line_chart("loss", [1.0], [("loss", [float("inf")], "raw")])


def test_report_says_what_a_validation_costs(trained_run: Path, tmp_path: Path):
    """The validator writes its seconds into the step's metrics line; the report shows their median."""
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    rows = [json.loads(line) for line in runs.metrics(run).read_text().splitlines()]
    for row, seconds in zip(rows[1::2], (3.0, 5.0), strict=True):
        row[runs.VALIDATION_SECONDS] = seconds
    runs.metrics(run).write_text("".join(json.dumps(row) + "\n" for row in rows))
    write_report(ReportConfig(run, output=tmp_path / "page.html", render=False))
    summary = KeyValueTables((tmp_path / "page.html").read_text()).tables[0]
    assert summary["time per validation"] == "5.0 s (median of 2)"
