"""Nothing silent: numbers a file or a user gives are held to what they can mean before any work starts.

A manifest's counts are bounded by the bytes its shards hold and its layouts by the tensors training reads;
a step larger than the cache is refused; every numeric setting of every stage has a declared domain, checked
through the flag and through the --config file alike.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import pkgutil
import shutil
import tempfile
import time
import typing
from pathlib import Path

import pytest
import typer
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import cogvx
from cogvx import config as configfile
from cogvx import runs
from cogvx.cli import app
from cogvx.config import Domain, numeric_fields
from cogvx.errors import CacheError, ConfigError
from cogvx.pipeline import models
from cogvx.preprocess.run import PreprocessConfig
from cogvx.render import RenderConfig
from cogvx.sample import SampleConfig
from cogvx.shards import Manifest, ShardRecord
from cogvx.shards.manifest import MAX_SHARD_BYTES, min_sample_bytes
from cogvx.shards.tools import InspectConfig
from cogvx.train.config import TrainConfig
from cogvx.train.data import rank_share, unit_count
from tests.conftest import property_examples

# Each stage config, the command that builds it, the arguments it needs besides the one tested, and whether
# the command takes a --config file.
STAGES = {
    TrainConfig: (["train"], ["--shards", "cache"], True),
    PreprocessConfig: (["preprocess"], ["--data", "videos"], True),
    SampleConfig: (["sample"], ["--prompt", "a cat", "--lora", "run"], True),
    RenderConfig: (["render", "run"], [], False),
    InspectConfig: (["shards", "inspect", "cache"], [], False),
}
REQUIRED = {TrainConfig: {"shards": "cache"}, PreprocessConfig: {"data": "videos"},
            SampleConfig: {"prompts": ("a cat",), "lora": "run"}, RenderConfig: {"run": "run"},
            InspectConfig: {"folder": "cache"}}  # fmt: skip


def _cli(*args: str):
    return CliRunner(env={"COLUMNS": "1000"}).invoke(app, list(args))


def _one_error_line(result) -> str:
    assert result.exit_code == 1, (result.exit_code, result.output, result.exception)
    [line] = result.output.strip().splitlines()
    assert line.startswith("error: ")
    return line


# --- manifests: counts and layouts ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_manifest(tiny_cache: Path) -> dict:
    return json.loads((tiny_cache / "manifest.json").read_text())


def _load(raw: dict) -> CacheError:
    """The one-line refusal of a manifest holding ``raw``, which names it."""
    folder = Path(tempfile.mkdtemp())
    (folder / "manifest.json").write_text(json.dumps(raw))
    with pytest.raises(CacheError) as err:
        Manifest.load(folder)
    shutil.rmtree(folder)
    assert "\n" not in str(err.value)
    assert str(err.value).startswith(str(folder / "manifest.json")), str(err.value)
    return err.value


@settings(max_examples=property_examples(20))
@given(
    count=st.one_of(
        st.integers(min_value=10**6),  # more than the shard's bytes can hold (the tiny shards are small)
        st.just(10**18),
        st.integers(max_value=-1),
        st.booleans(),
        st.floats(allow_nan=True, allow_infinity=True),
        st.text(max_size=3),
        st.none(),
    ),
    indexed=st.booleans(),
)
def test_a_manifest_count_the_shard_cannot_hold_is_refused_naming_the_manifest(tiny_manifest, count, indexed):
    raw = json.loads(json.dumps(tiny_manifest))
    shard = raw["shards"][0]
    shard["sample_count"] = count
    if not indexed:
        del shard["samples"]  # index-less entries (older caches) are held to the bytes alone
    err = _load(raw)
    if type(count) is int and count >= 0:
        assert "rebuild-manifest" in str(err) and "shards verify" in str(err)
        assert str(count) in str(err)


def test_the_bound_is_the_bytes_over_the_least_a_sample_takes(tiny_manifest):
    raw = json.loads(json.dumps(tiny_manifest))
    shard = raw["shards"][0]
    least = min_sample_bytes(shard["layouts"])
    assert least >= 4 * 512 and shard["bytes"] >= shard["sample_count"] * least  # real shards fit
    del shard["samples"]
    shard["sample_count"] = shard["bytes"] // least + 1
    err = _load(raw)
    assert f"at most {shard['bytes'] // least} fit" in str(err)
    shard["sample_count"] -= 1  # exactly as many as fit: a plausible claim, which verify checks against the shard
    folder = Path(tempfile.mkdtemp())
    (folder / "manifest.json").write_text(json.dumps(raw))
    assert Manifest.load(folder).shards[0].sample_count == shard["sample_count"]
    shutil.rmtree(folder)


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda s: s.update(bytes=MAX_SHARD_BYTES + 1), "more than any shard holds"),
        (lambda s: s.update(bytes=s["bytes"] // 4), "a sample takes at least"),
        (lambda s: s.update(samples=s["samples"][:1]), "but its index lists 1 samples"),
        (lambda s: s.update(excluded=[e["key"] for e in s["samples"]] * 2), "excludes"),
        (lambda s: s.update(excluded=[s["samples"][0]["key"]] * 2), "2 keys (1 distinct)"),
    ],
)
def test_counts_and_bytes_that_disagree_are_refused(tiny_manifest, change, words: str):
    raw = json.loads(json.dumps(tiny_manifest))
    change(raw["shards"][0])
    err = _load(raw)
    assert words in str(err) and "rebuild-manifest" in str(err)


def _moments(raw: dict) -> dict:
    return next(iter(raw["shards"][0]["layouts"].values()))


@pytest.mark.parametrize(
    "change, words",
    [
        (lambda lay: lay["moments"].update(shape=[4, 2, 2]), "the shape [4, 2, 2]. It must be 4 positive sizes"),
        (lambda lay: lay["moments"].update(shape=[4, 2, 2, 2, 1]), "It must be 4 positive sizes [2C, F, H, W]"),
        (lambda lay: lay["moments"].update(shape=[4, 0, 2, 2]), "It must be 4 positive sizes"),
        (lambda lay: lay["moments"].update(shape=[4, True, 2, 2]), "It must be 4 positive sizes"),
        (lambda lay: lay["moments"].update(shape=[4, 1.0, 2, 2]), "It must be 4 positive sizes"),
        (lambda lay: lay["prompt_embeds"].update(shape=[1, 2, 3]), "It must be 2 positive sizes [L, D]"),
        (lambda lay: lay.update(image_moments={"dtype": "float32", "shape": [8, 2]}), "[2C, 1, H, W]"),
        (lambda lay: lay["moments"].update(dtype="complex128"), 'the dtype "complex128", not one of'),
        (lambda lay: lay.pop("prompt_embeds"), "no 'prompt_embeds' tensor"),
        (lambda lay: lay.update(extra={"dtype": "float32", "shape": [1]}), 'lists a tensor "extra"'),
    ],
)
def test_a_layout_training_cannot_read_is_refused_when_the_manifest_loads(tiny_manifest, change, words: str):
    raw = json.loads(json.dumps(tiny_manifest))
    change(_moments(raw))
    err = _load(raw)
    assert words in str(err), str(err)


def test_train_on_a_three_dimensional_layout_says_one_line_not_a_traceback(tiny_cache: Path, tmp_path: Path):
    # check_packable unpacked the moments' shape and raised ValueError; the manifest is refused first now.
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    raw = json.loads((cache / "manifest.json").read_text())
    for shard in raw["shards"]:
        for layout in shard["layouts"].values():
            layout["moments"]["shape"] = layout["moments"]["shape"][1:]
    (cache / "manifest.json").write_text(json.dumps(raw))
    line = _one_error_line(_cli("train", "--shards", str(cache), "--output", str(tmp_path / "run")))
    assert str(cache / "manifest.json") in line and "It must be 4 positive sizes" in line
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_train_and_inspect_refuse_a_manifest_claiming_10_to_the_18_samples(tiny_cache: Path, tmp_path: Path):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_cache, cache)
    raw = json.loads((cache / "manifest.json").read_text())
    del raw["shards"][0]["samples"]
    raw["shards"][0]["sample_count"] = 10**18
    (cache / "manifest.json").write_text(json.dumps(raw))
    started = time.monotonic()
    for args in (
        ["train", "--shards", str(cache), "--output", str(tmp_path / "run")],
        ["shards", "inspect", str(cache)],
    ):
        line = _one_error_line(_cli(*args))
        assert "sample_count` = 1000000000000000000" in line and f"rebuild-manifest {cache}" in line
    assert time.monotonic() - started < 30


def test_the_rank_split_of_an_index_less_shard_is_ranges_not_lists():
    # The largest count a manifest can carry (MAX_SHARD_BYTES over the least a sample takes) splits at once.
    count = MAX_SHARD_BYTES // min_sample_bytes({})
    record = ShardRecord("a.tar", count, MAX_SHARD_BYTES, "0" * 64)
    started = time.monotonic()
    assert unit_count([record]) == count
    pieces = [rank_share([record], rank, 3) for rank in range(3)]
    assert time.monotonic() - started < 1
    assert [p.positions for (p,) in pieces] == [
        range(0, count // 3),
        range(count // 3, 2 * count // 3),
        range(2 * count // 3, count),
    ]


# --- a step larger than the cache -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def weightless_model(tmp_path_factory) -> Path:
    """The tiny model without its transformer weights: a refusal on it provably came before they loaded."""
    model = tmp_path_factory.mktemp("weightless") / "tiny"
    shutil.copytree(models.resolve_model("tiny"), model)
    (model / "transformer" / "diffusion_pytorch_model.safetensors").unlink()
    return model


def test_a_batch_larger_than_the_cache_is_refused_before_the_model_loads(
    tiny_cache: Path, weightless_model: Path, tmp_path: Path
):
    samples = unit_count(Manifest.load(tiny_cache).shards)
    args = ["train", "--shards", str(tiny_cache), "--model", str(weightless_model), "--output", str(tmp_path)]
    line = _one_error_line(_cli(*args, "--batch-size", str(samples + 1), "--workers", "0"))
    assert f"{samples + 1} samples per forward pass, more than the {samples} samples in {tiny_cache}" in line, line
    assert f"at most {samples} per pass" in line


def test_accumulating_over_more_micro_batches_than_the_cache_holds_trains(tiny_cache: Path, tmp_path: Path):
    """A few clips with a large --gradient-accumulation: several passes over the cache per step, as asked."""
    samples = unit_count(Manifest.load(tiny_cache).shards)
    args = ["train", "--shards", str(tiny_cache), "--output", str(tmp_path / "run"), "--max-steps", "1"]
    result = _cli(*args, "--gradient-accumulation", str(samples + 1), "--workers", "0", "--checkpoint-every", "0")
    assert result.exit_code == 0, result.output
    assert runs.lora_weights(tmp_path / "run").is_file()


def test_a_batch_size_of_10_to_the_9_is_refused_by_its_domain():
    line = _one_error_line(_cli("train", "--shards", "cache", "--batch-size", str(10**9)))
    assert line == "error: --batch-size must be from 1 to 4096 (got 1000000000): samples per batch and process."


def test_epochs_that_make_more_steps_than_the_bound_are_refused():
    with pytest.raises(ConfigError, match=r"--epochs 1e\+06 over 100000 samples .* more than 1000000000"):
        TrainConfig(shards="cache", epochs=1e6).steps_for(10**5, 1)


# --- every numeric setting of every stage has a domain ------------------------------------------------------


def _stage_configs() -> list[type]:
    """Every ``*Config`` dataclass in cogvx."""
    found = set()
    for module in pkgutil.walk_packages(cogvx.__path__, "cogvx."):
        if module.name.endswith("__main__"):
            continue
        for value in vars(importlib.import_module(module.name)).values():
            if isinstance(value, type) and value.__name__.endswith("Config") and dataclasses.is_dataclass(value):
                found.add(value)
    return sorted(found, key=lambda c: c.__name__)


def test_every_numeric_field_of_every_stage_config_declares_its_domain():
    configs = _stage_configs()
    assert set(STAGES) <= set(configs)
    missing = [f"{c.__name__}.{name}" for c in configs for name in numeric_fields(c) if name not in c.DOMAINS]
    assert missing == [], f"declare a Domain for {missing} in the class's DOMAINS"
    stray = [
        f"{c.__name__}.{name}" for c in configs for name in getattr(c, "DOMAINS", {}) if name not in numeric_fields(c)
    ]
    assert stray == []


def test_a_numeric_field_without_a_domain_is_a_bug_not_a_user_error():
    @dataclasses.dataclass
    class NewConfig:
        steps: int = 1
        DOMAINS: typing.ClassVar[dict] = {}

        def __post_init__(self):
            configfile.check_domains(self)

    with pytest.raises(TypeError, match="NewConfig.steps is numeric and has no Domain"):
        NewConfig()


def _options(stage: type) -> dict[str, object]:
    command, _, _ = STAGES[stage]
    group = typer.main.get_command(app)
    for name in command:
        if name not in getattr(group, "commands", {}):
            break
        group = group.commands[name]
    return {opt: p for p in group.params if p.param_type_name == "option" for opt in p.opts}


@pytest.mark.parametrize("stage", list(STAGES), ids=lambda c: c.__name__)
def test_a_setting_has_a_flag_exactly_when_its_domain_says_so(stage: type):
    options = _options(stage)
    for name in numeric_fields(stage):
        domain = stage.DOMAINS[name]
        flag = domain.flag or "--" + name.replace("_", "-")
        assert (flag in options) != domain.file_only, f"{stage.__name__}.{name}: {flag}"


def _outside(domain: Domain) -> st.SearchStrategy:
    """Values outside ``domain``: below and above it, the non-finite ones and 64-bit extremes."""
    huge = st.sampled_from([2**63, -(2**63), 10**30])
    if domain.integer:
        below = st.integers(max_value=int(domain.low) - 1)
        above = st.integers(min_value=int(domain.high) + 1)
        return st.one_of(below, above, huge)
    below = st.floats(max_value=domain.low, exclude_max=not domain.low_open, allow_nan=False, allow_infinity=False)
    above = st.floats(min_value=domain.high, exclude_min=not domain.high_open, allow_nan=False)
    return st.one_of(below, above, st.sampled_from([math.nan, math.inf, -math.inf, 1e300]))


def _inside(domain: Domain) -> st.SearchStrategy:
    if domain.integer:
        return st.integers(int(domain.low), int(domain.high))
    return st.floats(domain.low, domain.high, exclude_min=domain.low_open, exclude_max=domain.high_open)


def _setting(draw_from) -> tuple[type, str, Domain]:
    fields = [(stage, name) for stage in STAGES for name in numeric_fields(stage)]
    stage, name = draw_from(st.sampled_from(fields))
    return stage, name, stage.DOMAINS[name]


def _given_as(stage: type, name: str, value):
    hints = typing.get_type_hints(stage)
    return (value,) if typing.get_origin(hints[name]) is tuple else value


@settings(max_examples=property_examples(25))
@given(data=st.data())
def test_a_value_outside_its_domain_is_refused_in_one_line_by_flag_file_and_dataclass(data, tmp_path_factory):
    stage, name, domain = _setting(data.draw)
    value = data.draw(_outside(domain))
    command, needs, takes_file = STAGES[stage]
    flag = domain.flag or "--" + name.replace("_", "-")

    with pytest.raises(ConfigError) as err:
        stage(**REQUIRED[stage], **{name: _given_as(stage, name, value)})
    assert "\n" not in str(err.value) and (name if domain.file_only else flag) in str(err.value)

    if not domain.file_only:
        shown = repr(value) if isinstance(value, int) else str(value)
        line = _one_error_line(_cli(*command, *needs, f"{flag}={shown}"))
        assert line.startswith(f"error: {flag} must be {domain.describe()}"), line
    if takes_file:
        toml = tmp_path_factory.mktemp("config") / "settings.toml"
        toml_value = configfile._toml_value(_given_as(stage, name, value)) if math.isfinite(value) else (
            "nan" if math.isnan(value) else ("inf" if value > 0 else "-inf"))  # fmt: skip
        toml.write_text(f"{name} = {toml_value}\n")
        line = _one_error_line(_cli(*command, *needs, "--config", str(toml)))
        assert line.startswith(f"error: {toml}: {name} = ") and "is out of range: it must be" in line, line


# Rules beyond the domains (frame counts 4k+1, sizes in whole patches): an in-domain value is moved to the
# nearest one they allow, so that the domain alone is what the property tests.
SNAP = {
    "validation_frames": lambda v: v - (v - 1) % 4,
    "frames": lambda v: v - (v - 1) % 4,
    "max_frames": lambda v: v - (v - 1) % 4,
    "frame_buckets": lambda v: v - (v - 1) % 4,
    "validation_height": lambda v: max(8, v - v % 8),
    "validation_width": lambda v: max(8, v - v % 8),
    "eval_holdout": lambda v: v if v < 1 else float(int(v)),  # a fraction below 1, else a whole number of clips
}


@settings(max_examples=property_examples(25))
@given(data=st.data())
def test_a_value_inside_its_domain_is_accepted(data):
    stage, name, domain = _setting(data.draw)
    value = data.draw(_inside(domain))
    value = SNAP.get(name, lambda v: v)(value)
    if stage is PreprocessConfig and name in ("height", "width"):
        value = max(16, value - value % 16)
    extra = {"min_frames": 1} if name in ("max_frames", "frame_buckets") else {}
    if stage is PreprocessConfig and name == "min_frames":
        extra = {"max_frames": 1025}
    config = stage(**REQUIRED[stage], **extra, **{name: _given_as(stage, name, value)})
    assert getattr(config, name) == _given_as(stage, name, value)
