"""What a resume may change (train/resume.py): every setting is classified; refused changes stop the run in
one line listing all of them, applied ones are said aloud and are in effect, and a damaged or absurd
checkpoint is refused in one line naming its file and the checkpoint to resume from instead."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from typer.testing import CliRunner

from cogvx import config as configfile
from cogvx import runs
from cogvx.cli import app
from cogvx.errors import RunError
from cogvx.train import resume
from cogvx.train.config import TrainConfig
from tests.conftest import property_examples
from tests.helpers.commands import error_of

FIELDS = [f.name for f in dataclasses.fields(TrainConfig)]


def test_every_setting_of_train_config_is_classified():
    assert set(resume.POLICY) == set(FIELDS), "classify each new TrainConfig field in cogvx.train.resume.POLICY"
    assert set(resume.POLICY.values()) == {resume.REFUSED, resume.APPLIED, resume.DATA_ORDER, resume.NOT_COMPARED}


# The settings a checkpoint records: a resolved config, model included (as the loop records them).
SAVED = configfile.as_dict(
    TrainConfig(shards="/caches/x", output="runs/x", model="tiny", max_steps=6, rank=4, alpha=8, resume="auto")
)


def _other(value):
    """A value unlike ``value`` of its kind (None: a value where there was none)."""
    if value is None:
        return "set"
    if isinstance(value, bool):
        return not value
    if isinstance(value, (int, float)):
        return value * 2 + 1
    if isinstance(value, list):
        return [*value, "proj_out"]
    return f"{value}-other"


@hypothesis_settings(max_examples=property_examples(60))
@given(changed=st.sets(st.sampled_from(FIELDS)), unset=st.sets(st.sampled_from(FIELDS)))
def test_a_resume_is_refused_iff_a_refused_setting_changed_and_says_exactly_what_changed(changed, unset):
    new = dict(SAVED)
    for name in changed:
        if name in unset and name in new:
            del new[name]  # set before, unset now
        else:
            new[name] = _other(SAVED.get(name))
    kinds = {kind: {n for n in changed if resume.POLICY[n] == kind} for kind in resume.POLICY.values()}

    found = Path("runs/x/checkpoint-000004")
    changes = resume.compare(SAVED, new)
    assert set(changes.refused) == kinds[resume.REFUSED]
    assert set(changes.applied) == kinds[resume.APPLIED]
    assert set(changes.data_order) == kinds[resume.DATA_ORDER]
    if kinds[resume.REFUSED]:
        with pytest.raises(RunError) as err:
            resume.check(found, SAVED, new)
        message = str(err.value)
        listed = message.split("cannot change (", 1)[1].split("). Resume", 1)[0]
        assert {item.split(" ")[0] for item in listed.split(", ")} == kinds[resume.REFUSED]
        assert "\n" not in message and str(found) in message and "--output" in message
    else:
        said = resume.check(found, SAVED, new)
        if not kinds[resume.APPLIED]:
            assert said is None
        else:
            listed = said.split("with changed settings: ", 1)[1].rstrip(".")
            assert {item.split(" ")[0] for item in listed.split(", ")} == kinds[resume.APPLIED]


def test_a_cache_folder_spelled_another_way_is_the_same_cache(tmp_path: Path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cache").mkdir()
    assert not resume.compare({"shards": str(tmp_path / "cache")}, {"shards": "cache"}).refused
    assert resume.compare({"shards": str(tmp_path / "cache")}, {"shards": "elsewhere"}).refused


def test_a_checkpoint_that_recorded_no_resolved_model_compares_the_model_as_it_was_chosen():
    # Written before the resolved model was recorded: no "model" key when the cache's model was used.
    legacy = {k: v for k, v in SAVED.items() if k != "model"}
    found = Path("runs/x/checkpoint-000004")
    assert resume.check(found, legacy, SAVED | {"model_revision": "main"}) is None
    with pytest.raises(RunError, match=r"\(rank 4 -> 8\)"):
        resume.check(found, legacy, SAVED | {"rank": 8})


# --- real resumes through the CLI, with the tiny model ---


def _train(tiny_cache: Path, run: Path, *flags: str):
    argv = ["train", "--shards", str(tiny_cache), "--output", str(run), "--rank", "4", "--alpha", "8",
            "--workers", "0", "--mixed-precision", "fp32", "--learning-rate", "0.005", "--checkpoint-every", "1",
            "--keep-checkpoints", "10", *flags]  # fmt: skip
    return CliRunner().invoke(app, argv)


@pytest.fixture(scope="module")
def two_steps(tiny_cache: Path, tmp_path_factory) -> Path:
    """A run stopped after 2 of 6 steps, with a checkpoint after each."""
    run = tmp_path_factory.mktemp("two-steps") / "run"
    result = _train(tiny_cache, run, "--max-steps", "2")
    assert result.exit_code == 0, result.output
    return run


def _copy(run: Path, tmp_path: Path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    return copy


def test_a_changed_learning_rate_is_said_aloud_and_trains(two_steps: Path, tiny_cache: Path, tmp_path: Path):
    run = _copy(two_steps, tmp_path)
    result = _train(tiny_cache, run, "--resume", "auto", "--max-steps", "4", "--learning-rate", "0.5")
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())
    assert "with changed settings: learning_rate 0.005 -> 0.5, max_steps 2 -> 4" in said
    assert "learning rate 0.005 -> 0.5 from step 3" in said
    assert [r["lr"] for r in runs.read_metrics(run)] == [0.005, 0.005, 0.5, 0.5]
    assert runs.read_config(run)["learning_rate"] == 0.5 and "learning_rate = 0.5" in runs.config_toml(run).read_text()
    assert json.loads(runs.checkpoint_state(run / "checkpoint-000004").read_text())["config"]["learning_rate"] == 0.5

    # Adam moves each weight by about the learning rate per step: step 3 moved them 100 times as far as step 2.
    def moved(step: int) -> float:
        before, after = (load_file(runs.checkpoint_lora(runs.checkpoint(run, s))) for s in (step - 1, step))
        return max(float((after[k] - before[k]).abs().max()) for k in after)

    assert moved(2) < 0.02 and moved(3) > 0.1


def test_changed_settings_a_run_cannot_change_are_refused_in_one_line_listing_all(
    two_steps: Path, tiny_cache: Path, tmp_path: Path
):
    run = _copy(two_steps, tmp_path)
    before = runs.metrics(run).read_bytes()
    changed = ["--rank", "8", "--alpha", "4", "--random-flip", "0.5", "--optimizer", "adam", "--lr-scheduler",
               "linear", "--targets", "to_q", "--model", "tiny-i2v", "--learning-rate", "0.01"]  # fmt: skip
    message = error_of(_train(tiny_cache, run, "--resume", "auto", "--max-steps", "4", *changed))
    listed = message.split("cannot change (", 1)[1].split(")", 1)[0]
    assert listed == (
        "alpha 8 -> 4, lr_scheduler constant -> linear, model tiny -> tiny-i2v, optimizer adamw -> adam, "
        "random_flip 0 -> 0.5, rank 4 -> 8, targets to_q,to_k,to_v,to_out.0 -> to_q"
    )
    assert str(run / "checkpoint-000002") in message and "another --output" in message
    assert runs.metrics(run).read_bytes() == before and not (run / "checkpoint-000003").exists()


def _state(folder: Path, **changes) -> None:
    path = runs.checkpoint_state(folder)
    path.write_text(json.dumps(json.loads(path.read_text()) | changes))


DAMAGE = {
    "negative step": (runs.CHECKPOINT_STATE, lambda f: _state(f, step=-7), "step -7 is not a whole number"),
    "step of another folder": (runs.CHECKPOINT_STATE, lambda f: _state(f, step=1), "not the folder's step 2"),
    "endless batches": (
        runs.CHECKPOINT_STATE,
        lambda f: _state(f, batches_consumed=10**18),
        "batches_consumed 1000000000000000000 is more than 2 steps",
    ),
    "no processes": (runs.CHECKPOINT_STATE, lambda f: _state(f, world_size=0), "world_size 0 is not 1 or more"),
    "text step": (runs.CHECKPOINT_STATE, lambda f: _state(f, step="2"), "step '2' is not a whole number"),
    "not json": (runs.CHECKPOINT_STATE, lambda f: runs.checkpoint_state(f).write_text("{step: 2"), "is damaged ("),
    "a list": (runs.CHECKPOINT_STATE, lambda f: runs.checkpoint_state(f).write_text("[2]"), "not hold a JSON object"),
    "pickled optimizer": (
        "optimizer.pt",
        lambda f: torch.save({"hook": print}, runs.checkpoint_component(f, "optimizer")),
        "Weights only load failed",
    ),
    "truncated lora": (
        runs.CHECKPOINT_LORA,
        lambda f: runs.checkpoint_lora(f).write_bytes(runs.checkpoint_lora(f).read_bytes()[:100]),
        "is damaged (",
    ),
    "truncated schedule": (
        "lr_schedule.pt",
        lambda f: runs.checkpoint_component(f, "lr_schedule").write_bytes(b"PK\x03\x04"),
        "is damaged (",
    ),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_a_damaged_checkpoint_is_refused_in_one_line_naming_the_file_and_the_one_before(
    damage: str, two_steps: Path, tiny_cache: Path, tmp_path: Path
):
    run = _copy(two_steps, tmp_path)
    name, spoil, reason = DAMAGE[damage]
    spoil(run / "checkpoint-000002")
    before = runs.metrics(run).read_bytes()
    message = error_of(_train(tiny_cache, run, "--resume", "auto", "--max-steps", "4"))
    assert f"{run / 'checkpoint-000002' / name} is damaged" in message and reason in message
    assert f"--resume {run / 'checkpoint-000001'}" in message and f"delete {run / 'checkpoint-000002'}" in message
    assert runs.metrics(run).read_bytes() == before


def test_a_checkpoint_with_more_batches_than_its_steps_take_now_is_fine_when_accumulation_was_larger(
    two_steps: Path, tiny_cache: Path, tmp_path: Path
):
    # 2 steps at accumulation 3 consumed 6 batches; resumed at accumulation 1, step 3 takes the 7th.
    run = _copy(two_steps, tmp_path)
    folder = run / "checkpoint-000002"
    state = json.loads(runs.checkpoint_state(folder).read_text())
    _state(folder, batches_consumed=6, most_batches_per_step=3, config=state["config"] | {"gradient_accumulation": 3})
    result = _train(tiny_cache, run, "--resume", "auto", "--max-steps", "3")
    assert result.exit_code == 0, result.output
    written = json.loads(runs.checkpoint_state(run / "checkpoint-000003").read_text())
    assert (written["batches_consumed"], written["most_batches_per_step"]) == (7, 3)


@hypothesis_settings(max_examples=property_examples(20))
@given(
    scheduler=st.sampled_from(["constant", "constant_with_warmup", "linear", "cosine", "polynomial"]),
    old=st.fixed_dictionaries({"learning_rate": st.sampled_from([1e-4, 5e-3]), "lr_warmup_steps": st.integers(0, 4),
                               "max_steps": st.integers(6, 12), "weight_decay": st.sampled_from([0.0, 1e-4])}),
    new=st.fixed_dictionaries({"learning_rate": st.sampled_from([1e-4, 1e-2]), "lr_warmup_steps": st.integers(0, 4),
                               "max_steps": st.integers(6, 12), "weight_decay": st.sampled_from([0.0, 0.1]),
                               "adam_beta2": st.sampled_from([0.95, 0.99])}),
    at=st.integers(1, 5),
)  # fmt: skip
def test_the_new_learning_rate_schedule_and_optimizer_settings_are_in_effect_after_loading(scheduler, old, new, at):
    from cogvx.train.step import build_optimizer, build_schedule

    def built(settings: dict):
        cfg = TrainConfig(shards="cache", lr_scheduler=scheduler, **settings)
        param = torch.nn.Parameter(torch.ones(3))
        optimizer = build_optimizer(cfg, [param], cfg.learning_rate)
        return cfg, param, optimizer, build_schedule(cfg, optimizer)

    _, param, optimizer, schedule = built(old)
    for _ in range(at):  # the run that wrote the checkpoint
        param.grad = torch.ones(3)
        optimizer.step()
        schedule.step()
    cfg, param, resumed, resumed_schedule = built(new)
    resumed.load_state_dict(optimizer.state_dict())
    resumed_schedule.load_state_dict(schedule.state_dict())
    hyper = {"betas": (cfg.adam_beta1, cfg.adam_beta2), "eps": cfg.adam_epsilon, "weight_decay": cfg.weight_decay}
    said = resume.apply_to_optimizer(resumed, resumed_schedule, cfg.learning_rate, hyper)

    _, _, fresh, fresh_schedule = built(new)  # the new settings' rate at each step, from the start
    rates = [fresh_schedule.get_last_lr()[0]]
    for _ in range(at + 1):
        fresh.step()
        fresh_schedule.step()
        rates.append(fresh_schedule.get_last_lr()[0])
    (group,) = resumed.param_groups
    assert group["lr"] == pytest.approx(rates[at], rel=1e-12)  # the rate of the next step
    assert (group["betas"], group["weight_decay"]) == (hyper["betas"], cfg.weight_decay)
    param.grad = torch.ones(3)
    resumed.step()
    resumed_schedule.step()
    assert resumed_schedule.get_last_lr()[0] == pytest.approx(rates[at + 1], rel=1e-12)
    if old["learning_rate"] == new["learning_rate"]:
        assert said is None
    else:
        assert said == f"learning rate {old['learning_rate']:g} -> {new['learning_rate']:g} from step {at + 1}"
