"""The eval score through `cogvx train`: flags and TOML in, held-out clips never trained on, the same score for
the same LoRA (in two runs, on 1 or 2 processes), the base score beaten, --keep-best resumed exactly, and bad
input refused in one line."""

from __future__ import annotations

import hashlib
import json
import os
import sys
import uuid
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from typer.testing import CliRunner

from cogvx import runs
from cogvx.cli import app
from cogvx.pipeline import lora, models
from cogvx.pipeline.objective import Objective
from cogvx.preprocess.run import PreprocessConfig
from cogvx.preprocess.run import run as preprocess
from cogvx.shards import Manifest
from cogvx.shards.manifest import MIRROR_SUFFIX
from cogvx.shards.store import open_store
from cogvx.train import evaluation, heldout
from tests.conftest import CLIPS, property_examples, run_launcher

# A tiny LoRA that learns in a few steps, in fp32 so that numbers compare exactly.
SMALL = ["--rank", "4", "--alpha", "8", "--learning-rate", "1e-2", "--mixed-precision", "fp32"]
TIMING = ("step_seconds", "samples_per_s", "eval_seconds", "peak_memory_gb", runs.LAUNCH)


def _train(*args: str):
    return CliRunner().invoke(app, ["train", *SMALL, *args])


def _without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING} for r in records]


def _trained_keys(run: Path) -> set[str]:
    return {key for r in runs.read_metrics(run) for keys in r.get("samples", []) for key in keys}


def _held_out(cache: Path, request: float) -> heldout.EvalSet:
    eval_set, _ = heldout.choose(Manifest.load(cache), request, str(cache))
    assert eval_set is not None
    return eval_set


@pytest.fixture(scope="module")
def flipped(tmp_path_factory) -> Path:
    """The bundled clips with their mirrors (for --random-flip), encoded with the tiny model in fp32."""
    out = tmp_path_factory.mktemp("flipped") / "shards"
    preprocess(PreprocessConfig(data=CLIPS, output=out, model="tiny", dtype="fp32", workers=0, flip=True))
    return out


def test_flag_and_toml_hold_out_the_same_clips_whatever_the_run_and_record_them(flipped: Path, tmp_path: Path):
    first = _train("--shards", str(flipped), "--output", str(tmp_path / "a"), "--max-steps", "4", "--eval-every", "2",
                   "--eval-holdout", "2", "--workers", "0", "--checkpoint-every", "0")  # fmt: skip
    assert first.exit_code == 0, first.output
    assert "Eval score on 2 of 6 clips of" in first.output and "Base model's eval loss" in first.output
    toml = tmp_path / "settings.toml"
    toml.write_text(
        f'shards = "{flipped}"\noutput = "{tmp_path / "b"}"\nmax_steps = 4\neval_every = 2\neval_holdout = 2\n'
        "workers = 2\nbatch_size = 2\nrandom_flip = 0.5\ncheckpoint_every = 0\n"
    )
    second = _train("--config", str(toml))
    assert second.exit_code == 0, second.output

    eval_set = _held_out(flipped, 2)
    assert len(eval_set.keys) == 4 and sum(k.endswith(MIRROR_SUFFIX) for k in eval_set.keys) == 2  # with mirrors
    configs = [runs.read_config(tmp_path / name) for name in "ab"]
    manifest_hash = hashlib.sha256((flipped / "manifest.json").read_bytes()).hexdigest()
    for config in configs:
        assert config[runs.EVAL_SET] == evaluation.identity(eval_set, 1000)
        assert config[runs.EVAL_SAMPLES] == 2 and config[runs.CACHE_ID] == manifest_hash
    for name in "ab":
        trained = _trained_keys(tmp_path / name)
        assert trained and not trained & eval_set.keys
        rows = evaluation.eval_records(runs.read_metrics(tmp_path / name), configs[0][runs.EVAL_SET])
        assert [r["step"] for r in rows] == [2, 4] and all(r["eval_samples"] == 2 for r in rows)
    assert any(k.endswith(MIRROR_SUFFIX) for k in _trained_keys(tmp_path / "b"))  # --random-flip drew mirrors
    # The second run's config.toml keeps the request: run again from it, it holds out the same.
    assert "eval_holdout = 2" in runs.config_toml(tmp_path / "b").read_text()


@settings(max_examples=property_examples(3))
@given(
    workers=st.integers(0, 3), batch=st.integers(1, 2), accumulation=st.integers(1, 2), flip=st.sampled_from([0, 0.5])
)
def test_no_held_out_sample_reaches_training_for_any_workers_batch_or_accumulation(
    flipped: Path, tmp_path: Path, workers: int, batch: int, accumulation: int, flip: float
):
    run = tmp_path / uuid.uuid4().hex
    done = _train("--shards", str(flipped), "--output", str(run), "--max-steps", "3", "--eval-every", "3",
                  "--eval-holdout", "2", "--workers", str(workers), "--batch-size", str(batch),
                  "--gradient-accumulation", str(accumulation), "--random-flip", str(flip),
                  "--checkpoint-every", "0")  # fmt: skip
    assert done.exit_code == 0, done.output
    eval_set = _held_out(flipped, 2)
    trained = _trained_keys(run)
    assert len(trained) >= 1 and not trained & eval_set.keys
    assert runs.read_config(run)[runs.EVAL_SET] == evaluation.identity(eval_set, 1000)


def test_keep_best_keeps_the_lowest_score_the_score_beats_the_base_and_a_resumed_run_ends_the_same(
    tiny_cache: Path, tmp_path: Path
):
    common = ["--shards", str(tiny_cache), "--eval-holdout", "2", "--eval-every", "2", "--keep-best",
              "--workers", "0", "--checkpoint-every", "4"]  # fmt: skip
    whole = _train(*common, "--output", str(tmp_path / "whole"), "--max-steps", "8")
    assert whole.exit_code == 0, whole.output
    stopped = _train(*common, "--output", str(tmp_path / "resumed"), "--max-steps", "4")
    assert stopped.exit_code == 0, stopped.output
    resumed = _train(*common, "--output", str(tmp_path / "resumed"), "--max-steps", "8", "--resume", "auto")
    assert resumed.exit_code == 0, resumed.output

    # The same LoRA scores the same in two runs, and a resumed run is the uninterrupted one: every line equal.
    records = runs.read_metrics(tmp_path / "whole")
    assert _without_timing(runs.read_metrics(tmp_path / "resumed")) == _without_timing(records)
    identity = runs.read_config(tmp_path / "whole")[runs.EVAL_SET]
    (base,) = evaluation.eval_records(records, identity, base=True)
    assert base["step"] == 0 and records[0] is base  # step 0, first, once (the resume scored no base again)
    scored = evaluation.eval_records(records, identity)
    assert [r["step"] for r in scored] == [2, 4, 6, 8]
    assert scored[-1]["eval_loss"] < base["eval_base_loss"]  # training lowers the held-out score

    best = min(scored, key=lambda r: (r["eval_loss"], r["step"]))
    for name in ("whole", "resumed"):
        kept = evaluation.read_best(tmp_path / name)
        assert kept == {"eval_set": identity, "eval_loss": best["eval_loss"], "step": best["step"]}
    weights = [load_file(runs.lora_weights(runs.best(tmp_path / name))) for name in ("whole", "resumed")]
    assert weights[0].keys() == weights[1].keys() and all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    # The end message and the model card say it.
    line = evaluation.summary(records).line()
    assert line.startswith(f"eval loss {scored[-1]['eval_loss']:.4g} at step 8") and line in whole.output
    assert f"base {base['eval_base_loss']:.4g}" in line
    card = runs.model_card(tmp_path / "whole").read_text()
    assert f"| best eval loss | {best['eval_loss']:.4f} at step {best['step']} |" in card
    assert "not a measure of visual quality" in card


# `python -m cogvx` under torchrun, as tests/train/test_ddp.py launches it.
_LAUNCH = "import sys\nfrom cogvx.cli import app\napp(sys.argv[1:], prog_name='cogvx')\n"


@pytest.mark.slow
def test_one_and_two_processes_give_the_same_score_for_the_same_lora(tiny_cache: Path, tmp_path: Path):
    script, output = tmp_path / "launch.py", tmp_path / "run"
    script.write_text(_LAUNCH)
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", str(script),
        "train", "--shards", str(tiny_cache), "--output", str(output), "--max-steps", "2", *SMALL,
        "--workers", "0", "--checkpoint-every", "2", "--eval-every", "2", "--eval-holdout", "3",
    ]  # fmt: skip
    done = run_launcher(command, env=os.environ | {"OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    records = runs.read_metrics(output)
    eval_set = _held_out(tiny_cache, 3)
    assert not _trained_keys(output) & eval_set.keys  # on either process

    # The base model and the trained LoRA scored on one process: the numbers the two processes gathered.
    info = models.ModelInfo.read("tiny", None, None)
    transformer = info.load_transformer(torch.float32, "cpu")
    lora.add_lora(transformer, 4, 8.0, lora.DEFAULT_TARGETS, 0.0)
    lora.load_lora_state(transformer, load_file(runs.checkpoint_lora(runs.checkpoint(output, 2))))
    objective = Objective(transformer.config, info.load_scheduler().alphas_cumprod, info.scaling_factor)
    evaluator = evaluation.Evaluator(
        eval_set, open_store(tiny_cache), Manifest.load(tiny_cache), objective, every=2, compute_dtype=torch.float32,
        device="cpu",
    )  # fmt: skip

    # Each pair's forward agrees to float32 rounding only: the processes' weights sit elsewhere in memory (DDP
    # copies them), and the CPU's BLAS rounds by alignment. Split, gathered and reduced, the score is the same.
    def numbers(fields: dict) -> dict:
        return {k: v for k, v in fields.items() if k not in TIMING and isinstance(v, float)}

    (base,) = evaluation.eval_records(records, evaluator.identity, base=True)
    assert numbers(base) == pytest.approx(numbers(evaluator.base_fields(transformer)), rel=1e-6)
    (two,) = evaluation.eval_records(records, evaluator.identity)
    one = evaluation.eval_fields(evaluator.score(transformer), evaluator.identity)
    assert numbers(one).keys() == {"eval_loss", "eval_high", "eval_mid", "eval_low"}
    assert {k: two[k] for k in numbers(one)} == pytest.approx(numbers(one), rel=1e-6)
    assert two["eval_samples"] == 3 and two["eval_set"] == runs.read_config(output)[runs.EVAL_SET]


def test_the_default_holds_out_of_a_big_cache_and_says_why_not_for_a_small_one(
    tiny_cache: Path, tmp_path: Path, monkeypatch
):
    small = _train("--shards", str(tiny_cache), "--output", str(tmp_path / "small"), "--max-steps", "1",
                   "--workers", "0", "--checkpoint-every", "0")  # fmt: skip
    assert small.exit_code == 0, small.output
    assert f"No eval score: {tiny_cache} holds 6 clips, fewer than the {heldout.DEFAULT_MIN_CLIPS}" in small.output
    config = runs.read_config(tmp_path / "small")
    assert runs.EVAL_SET not in config and runs.CACHE_ID in config
    assert not any("eval_loss" in r or "eval_base_loss" in r for r in runs.read_metrics(tmp_path / "small"))

    # A cache as big as the default rule asks (20 clips; here the threshold is this cache's 6 clips).
    monkeypatch.setattr(heldout, "DEFAULT_MIN_CLIPS", 6)
    big = _train("--shards", str(tiny_cache), "--output", str(tmp_path / "big"), "--max-steps", "2",
                 "--workers", "0", "--checkpoint-every", "0", "--report-to", "tensorboard")  # fmt: skip
    assert big.exit_code == 0, big.output
    assert f"Eval score on 1 of 6 clips of {tiny_cache}, held out of training (by default;" in big.output
    records = runs.read_metrics(tmp_path / "big")
    assert records[0]["step"] == 0 and "eval_base_loss" in records[0]  # the base score, at step 0
    assert [r["step"] for r in records if "eval_loss" in r] == [2]  # not due at 500: the last step is scored

    # The trackers and the report page show it too.
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = set()
    for events in runs.logs(tmp_path / "big").rglob("events.out.tfevents.*"):
        accumulator = EventAccumulator(str(events))
        accumulator.Reload()
        tags |= set(accumulator.Tags()["scalars"])
    assert {"eval/loss", "eval/high", "eval/mid", "eval/low", "eval/base_loss"} <= tags
    page = CliRunner().invoke(app, ["report", str(tmp_path / "big")])
    assert page.exit_code == 0, page.output
    assert "held-out eval loss (1 samples)" in runs.report(tmp_path / "big").read_text()


def _other_encoders(cache: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(cache, target)
    manifest = json.loads((target / "manifest.json").read_text())
    manifest["producer"]["encoders"]["text_encoder_fingerprint"] = "another-text-encoder"
    (target / "manifest.json").write_text(json.dumps(manifest))
    return target


@pytest.mark.parametrize(
    "args, words",
    [
        (["--eval-holdout", "6"], "holds out 6 clips, but {cache} holds 6, leaving none to train on"),
        (["--eval-holdout", "5", "--batch-size", "2"], "leave 1 samples of {cache} to train on, fewer than the 2"),
        (["--eval-shards", "{other}"], "--eval-shards {other}: The cache {other} was encoded for"),
        (["--eval-holdout", "2", "--eval-shards", "{cache}"], "Give --eval-holdout"),
        (["--eval-every", "0", "--keep-best"], "--keep-best keeps the LoRA of the lowest eval score"),
        (["--keep-best"], "--keep-best keeps the LoRA of the lowest eval score, and this run has none. No eval"),
    ],
    ids=["larger-than-cache", "none-left-for-a-batch", "other-encoders", "both", "keep-best-no-eval", "small-cache"],
)
def test_bad_eval_input_is_one_line_naming_the_fix(tiny_cache: Path, tmp_path: Path, args: list[str], words: str):
    other = _other_encoders(tiny_cache, tmp_path / "other") if "{other}" in " ".join(args) else None
    fill = {"cache": tiny_cache, "other": other}
    args = [a.format(**fill) for a in args]
    out = _train("--shards", str(tiny_cache), "--output", str(tmp_path / "run"), "--max-steps", "1",
                 "--workers", "0", *args)  # fmt: skip
    assert out.exit_code == 1, out.output
    lines = [line for line in out.output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and words.format(**fill) in " ".join(out.output.split()), out.output
    assert not (tmp_path / "run").exists()  # refused before the run folder holds anything


def test_a_resume_that_would_train_on_other_clips_is_refused_in_one_line(tiny_cache: Path, tmp_path: Path, monkeypatch):
    # Held out by the default rule (here from 6 clips on): --eval-every 0 on resume would hold nothing out.
    monkeypatch.setattr(heldout, "DEFAULT_MIN_CLIPS", 6)
    args = ["--shards", str(tiny_cache), "--output", str(tmp_path / "run"), "--workers", "0", "--checkpoint-every", "1"]
    first = _train(*args, "--max-steps", "1")
    assert first.exit_code == 0, first.output
    again = _train(*args, "--max-steps", "2", "--eval-every", "0", "--resume", "auto")
    assert again.exit_code == 1
    line = " ".join(again.output.split())
    assert "it held other clips out of training (held-out set " in line and ", now none)" in line, again.output
    assert "--eval-every and --eval-holdout" in line
    resumed = _train(*args, "--max-steps", "2", "--resume", "auto")  # as it was: resumes
    assert resumed.exit_code == 0, resumed.output
