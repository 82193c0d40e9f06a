"""cogvx compare: runs of one cache side by side on one page, checked in a real headless browser."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from cogvx.cli import app
from cogvx.compare import CompareConfig
from cogvx.compare import run as compare
from cogvx.errors import ConfigError, RunError
from cogvx.render import RenderConfig, run_render
from cogvx.train.config import TrainConfig
from cogvx.train.loop import run as train
from tests.helpers.browser import Elements, Tables, dump_dom
from tests.helpers.runfolders import PROMPTS, make_validation

HELD_OUT = "9f2c4e1ab37d" * 5 + "abcd"  # a held-out set's identity hash, as eval rows carry it
BASE = 0.9  # the base model's held-out loss (LoRA scale 0)
EVAL_A = {2: 0.8, 4: 0.7}  # best at step 4
EVAL_B = {2: 0.75, 4: 0.78}  # best at step 2


def add_eval_rows(run: Path, scores: dict[int, float], eval_set: str = HELD_OUT, base: float = BASE) -> None:
    """Held-out rows as training will write them into metrics.jsonl (the eval producer is being built in
    parallel: these follow the agreed format, one base row and one row per scored step)."""
    rows = [{"step": 0, "eval_base_loss": base, "eval_set": eval_set, "eval_samples": 6}]
    for step, loss in scores.items():
        parts = {"eval_high": loss + 0.1, "eval_mid": loss, "eval_low": loss - 0.1}
        rows.append({"step": step, "eval_loss": loss, **parts, "eval_set": eval_set, "eval_samples": 6})
    with open(run / "metrics.jsonl", "a") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)


def set_config(run: Path, **changes) -> None:
    path = run / "config.json"
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


@pytest.fixture(scope="module")
def two_runs(tiny_cache: Path, tmp_path_factory) -> tuple[Path, Path]:
    """Two real tiny runs of one cache that differ in learning rate and rank; A has validation videos at
    steps 2 and 4, B at step 4 only; both have held-out scores."""
    root = tmp_path_factory.mktemp("compare")
    made = []
    for name, learning_rate, rank in (("lr-high", 1e-2, 4), ("lr-low", 5e-3, 8)):
        cfg = TrainConfig(
            shards=tiny_cache, output=root / name, max_steps=4, rank=rank, learning_rate=learning_rate,
            mixed_precision="no", workers=0, checkpoint_every=0,
        )  # fmt: skip
        train(cfg)
        made.append(cfg.output)
    a, b = made
    make_validation(a, steps=(2, 4))
    run_render(RenderConfig(a))
    shutil.copytree(a / "validation" / "step-000004", b / "validation" / "step-000004")
    add_eval_rows(a, EVAL_A)
    add_eval_rows(b, EVAL_B)
    return a, b


def copy_runs(two_runs: tuple[Path, Path], into: Path) -> tuple[Path, Path]:
    return tuple(shutil.copytree(run, into / run.name) for run in two_runs)


def test_compare_shows_settings_best_steps_curves_and_videos_in_a_browser(two_runs, tmp_path, monkeypatch):
    a, b = two_runs
    monkeypatch.chdir(tmp_path)
    result = compare(CompareConfig(runs=(a, b)))
    page = tmp_path / "compare.html"  # the default output, in the current folder
    assert result.path == Path("compare.html") and page.is_file()
    text = page.read_text()
    assert not re.search(r"(https?:)?//[a-z]", text), "the page must not reach the network"

    # The settings that differ, one column per run; the run's own folder and shared settings are not differences.
    assert set(result.differing) == {"learning_rate", "rank"}
    settings = {row[0]: row[1:] for row in Tables(text).tables["settings"]}
    assert settings["setting"] == ["A lr-high", "B lr-low"]
    assert settings["learning_rate"] == ["0.01", "0.005"] and settings["rank"] == ["4", "8"]
    # Best held-out step of each, against the base model's score.
    assert result.best == {"A": (4, 0.7), "B": (2, 0.75)}
    assert result.eval_sets == [HELD_OUT] and "eval-sets-differ" not in text
    head, row_a, row_b = Tables(text).tables["runs"]
    best = dict(zip(head, row_a, strict=True)), dict(zip(head, row_b, strict=True))
    shown = [(r["best step"], r["best loss"], r["vs base"]) for r in best]
    assert shown == [("4", "0.7", "-22.2%"), ("2", "0.75", "-16.7%")]
    assert best[0]["base loss"] == "0.9" and best[0]["held-out set"] == HELD_OUT[:12]
    assert best[0]["eval_high / eval_mid / eval_low"] == "0.8 / 0.7 / 0.6"

    dom = Elements(dump_dom(page))
    body = dom.find("body")[0]
    assert body.get("data-ready") == "1", "the page's script did not finish"
    assert json.loads(body["data-errors"]) == [], body["data-errors"]
    # Curves: held-out loss of each run (2 scored steps) with the shared base score dashed, and the smoothed
    # training loss of each run (4 steps).
    lines = [(line["class"], len(line["points"].split())) for line in dom.find("polyline")]
    assert lines == [("r0", 2), ("r1", 2), ("base", 2), ("r0", 4), ("r1", 4)]
    # Videos side by side per prompt and step: A at steps 2 and 4, B at step 4 only; every video decoded.
    videos = dom.find("video")
    assert len(videos) == len(PROMPTS) * 3 == result.videos
    assert {v["data-size"] for v in videos} == {"64x32"}
    cells = sorted((c["data-run"], c["data-step"], c["data-sample"]) for c in dom.find("td", class_=r"\bcell\b"))
    assert cells == sorted((r, s, str(k)) for r, s in (("A", "2"), ("A", "4"), ("B", "4")) for k in range(len(PROMPTS)))
    assert len(dom.find("td", class_="empty", data_run="B", data_step="2")) == len(PROMPTS)
    assert PROMPTS[1] in "".join(dom.text) and not dom.find("b")  # prompts are text, never markup

    # Never overwritten silently.
    with pytest.raises(ConfigError, match="--overwrite") as refused:
        compare(CompareConfig(runs=(a, b)))
    assert "\n" not in str(refused.value)
    compare(CompareConfig(runs=(a, b), overwrite=True))


def test_runs_of_different_caches_are_refused_in_one_line(two_runs, tmp_path):
    a, b = copy_runs(two_runs, tmp_path)
    config = json.loads((a / "config.json").read_text())
    cache = config["shards"]
    # A run records its cache's identity, the sha256 of the manifest: a copy read from elsewhere is the same cache.
    assert config["cache_id"] == hashlib.sha256((Path(cache) / "manifest.json").read_bytes()).hexdigest()
    other = shutil.copytree(cache, tmp_path / "other-cache")
    set_config(b, shards=str(other))
    assert compare(CompareConfig(runs=(a, b), output=tmp_path / "copy.html")).differing == [
        "learning_rate", "rank", "shards"
    ]  # fmt: skip
    # Without it (runs of an older cogvx), the location decides.
    set_config(a, cache_id=None)
    set_config(b, cache_id=None)
    with pytest.raises(RunError) as refused:
        compare(CompareConfig(runs=(a, b), output=tmp_path / "page.html"))
    message = str(refused.value)
    assert "\n" not in message and str(a) in message and str(b) in message and "one cache" in message

    # The cache's identity decides where both runs record it: a copy of the cache is the same cache,
    set_config(a, cache_id="1" * 64)
    set_config(b, cache_id="1" * 64)
    assert compare(CompareConfig(runs=(a, b), output=tmp_path / "page.html")).differing == [
        "learning_rate", "rank", "shards"
    ]  # fmt: skip
    # and a cache rebuilt in place is another one.
    set_config(b, cache_id="2" * 64, shards=cache)
    with pytest.raises(RunError, match="cache_id 111111111111 vs 222222222222"):
        compare(CompareConfig(runs=(a, b), output=tmp_path / "again.html"))


def test_different_held_out_sets_are_marked_not_comparable(two_runs, tmp_path):
    a, b = copy_runs(two_runs, tmp_path)
    lines = (b / "metrics.jsonl").read_text().splitlines()
    rows = [json.loads(line) for line in lines]
    other = [r | {"eval_set": "0123456789ab-other"} if "eval_set" in r else r for r in rows]
    (b / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in other))
    (b / "validation" / "step-000004" / "sample-01.mp4").unlink()  # latents without their video

    result = compare(CompareConfig(runs=(a, b), output=tmp_path / "page.html"))
    assert result.eval_sets == [HELD_OUT, "0123456789ab-other"]
    assert any("not comparable" in note for note in result.notes)
    text = (tmp_path / "page.html").read_text()
    dom = Elements(text)
    assert dom.find("p", id="eval-sets-differ")
    plots = dom.find("div", class_="eval-set")
    assert [p["data-eval-set"] for p in plots] == result.eval_sets  # a plot per held-out set, never one for both
    assert len(dom.find("td", class_="not-comparable")) == 2
    # Only latents: the cell and the notes say how to get the video.
    missing = dom.find("td", class_="missing", data_run="B", data_step="4", data_sample="1")
    assert len(missing) == 1 and f"not rendered: run cogvx render {b}" in text
    assert any(f"cogvx render {b}" in note for note in result.notes)


def test_a_run_folder_on_object_storage_compares_with_a_local_one(two_runs, s3, tmp_path):
    a, b = two_runs
    for path in sorted(b.rglob("*")):
        if path.is_file():
            s3.client.upload_file(str(path), s3.bucket, f"runs/lr-low/{path.relative_to(b).as_posix()}")
    remote = f"s3://{s3.bucket}/runs/lr-low"
    page = tmp_path / "page.html"
    result = compare(CompareConfig(runs=(a, remote), output=page))
    assert result.runs == [str(a), remote] and set(result.differing) == {"learning_rate", "rank"}
    assert result.best == {"A": (4, 0.7), "B": (2, 0.75)}
    dom = Elements(dump_dom(page))
    body = dom.find("body")[0]
    assert body.get("data-ready") == "1" and json.loads(body["data-errors"]) == [], body.get("data-errors")
    remote_videos = [v for v in dom.find("video") if v["src"].startswith("data:video/mp4;base64,")]
    assert len(remote_videos) == len(PROMPTS)  # embedded: a browser cannot read s3://
    assert {v["data-size"] for v in remote_videos} == {"64x32"}  # and it decoded them
    assert s3.secret not in page.read_text()


def test_the_config_refuses_what_it_cannot_compare(tmp_path):
    with pytest.raises(ConfigError, match="two or more"):
        CompareConfig(runs=(tmp_path,))
    with pytest.raises(ConfigError, match="given twice"):
        CompareConfig(runs=(tmp_path, tmp_path / "x" / ".."))
    with pytest.raises(ConfigError, match=r"\.html"):
        CompareConfig(runs=(tmp_path / "a", tmp_path / "b"), output=tmp_path / "page.pdf")
    with pytest.raises(RunError, match="does not exist"):
        compare(CompareConfig(runs=(tmp_path / "a", tmp_path / "b"), output=tmp_path / "page.html"))


@pytest.mark.skipif(
    "compare" not in typer.main.get_command(app).commands, reason="`cogvx compare` is wired into cli.py at merge"
)
def test_cli_writes_the_page_and_never_overwrites_silently(two_runs, tmp_path):
    a, b = two_runs
    page = tmp_path / "runs.html"
    done = CliRunner().invoke(app, ["compare", str(a), str(b), "--output", str(page)])
    assert done.exit_code == 0, done.output
    assert page.is_file()
    again = CliRunner().invoke(app, ["compare", str(a), str(b), "--output", str(page)])
    assert again.exit_code == 1 and "--overwrite" in again.output
    assert CliRunner().invoke(app, ["compare", str(a), str(b), "--output", str(page), "--overwrite"]).exit_code == 0
