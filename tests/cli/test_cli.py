"""The command line: help defaults come from the config dataclasses, errors are typed, --version works."""

from __future__ import annotations

import dataclasses
import re
import subprocess
import sys
import textwrap

import pytest
import typer
from typer.testing import CliRunner

from cogvx import __version__, cli
from cogvx import config as configfile
from cogvx.cli import app
from cogvx.cligen import command
from cogvx.config import integers, setting, stage
from cogvx.train import config as train_config

# Each command's config dataclass, and the flags whose field has another (plural) name.
CONFIGS = {
    ("preprocess",): (
        cli.PreprocessConfig,
        {"resolution": "resolutions", "frame_bucket": "frame_buckets", "validation_prompt": "validation_prompts"},
    ),
    ("train",): (cli.TrainConfig, {}),
    ("sample",): (cli.SampleConfig, {"prompt": "prompts"}),
    ("render",): (cli.RenderConfig, {}),
    ("report",): (cli.ReportConfig, {}),
    ("shards", "inspect"): (cli.InspectConfig, {}),
}


def _command(path: tuple[str, ...]):
    command = typer.main.get_command(app)
    for name in path:
        command = command.commands[name]
    return command


def _default(field: dataclasses.Field):
    if field.default is not dataclasses.MISSING:
        return field.default
    if field.default_factory is not dataclasses.MISSING:
        return field.default_factory()
    return None


@pytest.mark.parametrize("path", list(CONFIGS), ids=" ".join)
def test_every_help_default_is_the_dataclass_default(path):
    config, renamed = CONFIGS[path]
    fields = {f.name: f for f in dataclasses.fields(config)}
    checked = 0
    for param in _command(path).params:
        name = renamed.get(param.name, param.name)
        if name not in fields or param.name == "config":
            continue
        shown = re.search(r"\[default: ([^\]]*)\]", " ".join((param.help or "").split()))
        default = _default(fields[name])
        if default in (None, "", ()):
            continue  # unset means a rule ("the model's native size"), stated in words
        assert shown, f"{' '.join(path)} --{param.name.replace('_', '-')}: help does not show its default {default!r}"
        assert shown.group(1) == cli._shown(default), f"{' '.join(path)} --{param.name}: help says {shown.group(1)!r}"
        checked += 1
    assert checked >= 1


def test_shown_defaults_read_as_users_type_them():
    assert cli._shown(True) == "on"
    assert cli._shown(1e-4) == "0.0001"
    assert cli._shown(128.0) == "128"
    assert cli._shown(("to_q", "to_k")) == "to_q,to_k"


def test_a_rule_is_refused_for_a_field_that_has_a_default():
    with pytest.raises(TypeError, match="has a default"):
        cli._help(cli.TrainConfig, "batch_size", "Samples per batch.", "whatever")


def test_version():
    result = CliRunner().invoke(app, ["--version"])
    assert result.exit_code == 0
    assert result.output.strip() == f"cogvx {__version__}"


def _cogvx(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cogvx", *args], capture_output=True, text=True, cwd=cwd, timeout=120)


def test_a_user_error_is_one_line_and_exit_1(tmp_path):
    result = _cogvx("train", "--shards", str(tmp_path / "missing"), "--output", str(tmp_path / "run"))
    assert result.returncode == 1
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "missing" in lines[0], result.stderr


def test_a_config_file_value_of_the_wrong_type_is_one_line_naming_file_and_key(tmp_path):
    config = tmp_path / "run.toml"
    config.write_text('shards = "x"\nmax_steps = "ten"\n')
    result = _cogvx("train", "--config", str(config))
    assert result.returncode == 1 and "Traceback" not in result.stderr
    message = " ".join(result.stderr.split())
    assert str(config) in message and 'max_steps = "ten" is not an integer' in message


@pytest.mark.parametrize("kind", ["ValueError", "RuntimeError", "KeyError"])
def test_an_error_that_is_not_the_users_keeps_its_traceback(tmp_path, kind):
    # A library or cogvx bug raised inside a stage (here: torch-style errors from the training loop) must
    # not be dressed up as a one-line user error: the traceback is printed and the exit code is non-zero.
    script = textwrap.dedent(
        f"""
        import sys
        import cogvx.train.loop

        def broken(cfg, show_progress=False):
            raise {kind}("expected a tensor on cuda:0, got cpu (raised below cogvx)")

        cogvx.train.loop.run = broken
        from cogvx.cli import main
        sys.argv = ["cogvx", "train", "--shards", {str(tmp_path)!r}]
        main()
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "Traceback (most recent call last)" in result.stderr
    assert f"{kind}:" in result.stderr and "raised below cogvx" in result.stderr
    assert "error:" not in result.stderr.splitlines()[-1]


# --- the generated CLI: one declaration per setting gives its flag, its help and its TOML key ----------------


@stage
class _ToyConfig:
    name: str = setting(help="A required positional.", argument=True)
    steps: int = setting(3, "Steps.", domain=integers(1, 100))
    tags: tuple[str, ...] = setting((), "A tag, repeatable.", name="tag")
    modules: tuple[str, ...] = setting(("a", "b"), "Comma-separated.", comma_list=True)
    fast: bool = setting(True, "Go fast.", decls=("--fast/--no-fast",))
    deep: bool = setting(True, "Deep or quick.", decls=("--deep/--quick",))
    secret: int = setting(7, domain=integers(0, 9), file_only=True)

    def __post_init__(self):
        configfile.check_domains(self)
        if isinstance(self.modules, str):
            self.modules = tuple(self.modules.split(","))


def _toy(*args: str) -> tuple[object, _ToyConfig | None]:
    toy, built = typer.Typer(rich_markup_mode=None), []  # as cogvx: "[default: ...]" is plain text

    @command(toy, _ToyConfig)
    def go(build):
        """Build the toy config."""
        built.append(build())

    @toy.callback()
    def group() -> None:
        """Keeps ``go`` a subcommand."""

    result = CliRunner(env={"COLUMNS": "200"}).invoke(toy, ["go", *args])
    return result, built[0] if built else None


def test_the_generated_command_builds_the_config_from_the_flags_given_over_the_file(tmp_path):
    result, cfg = _toy("n")
    assert result.exit_code == 0, result.output
    assert (cfg.name, cfg.steps, cfg.tags, cfg.modules, cfg.fast, cfg.deep) == ("n", 3, (), ("a", "b"), True, True)
    file = tmp_path / "toy.toml"
    file.write_text("steps = 5\nsecret = 2\nfast = false\n")
    result, cfg = _toy("n", "--config", str(file), "--tag", "x", "--tag", "y", "--modules", "c,d", "--quick")
    assert result.exit_code == 0, result.output
    assert (cfg.steps, cfg.secret, cfg.fast) == (5, 2, False)  # the file's, where no flag was given
    assert (cfg.tags, cfg.modules, cfg.deep) == (("x", "y"), ("c", "d"), False)
    result, cfg = _toy("n", "--config", str(file), "--steps", "9", "--fast")
    assert (cfg.steps, cfg.fast) == (9, True)  # a flag wins over the file


def test_the_generated_help_shows_each_default_once_from_the_dataclass():
    result, _ = _toy("--help")
    text = " ".join(result.output.split())
    assert "Steps. [default: 3]" in text and "Comma-separated. [default: a,b]" in text
    assert "--fast / --no-fast" in text and "Go fast. [default: on]" in text
    assert "--deep / --quick" in text and "[default: deep]" in text
    assert "--secret" not in text and "--tag" in text and "--config" in text


def test_train_sections_keep_the_fields_flat_and_each_checks_its_own(tmp_path):
    sections = [{f.name for f in dataclasses.fields(s)} for s in train_config.SECTIONS]
    assert sum(len(s) for s in sections) == len(dataclasses.fields(cli.TrainConfig))  # each field in one section
    assert {"rank", "learning_rate", "checkpointing", "eval_every", "hub_model_id"} <= set().union(*sections)
    result = _cogvx("train", "--shards", str(tmp_path), "--push-checkpoints")  # the hub section refuses it
    assert result.returncode == 1 and "--push-to-hub needs --hub-model-id" in result.stderr
