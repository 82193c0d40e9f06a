"""The shape the package promises (docs/architecture.md), checked on the source itself.

- Every name in a run folder or a cache folder is spelled by its owner only (cogvx/runs.py,
  cogvx/shards/paths.py); everyone else builds paths through them.
- Every ``--flag`` that cogvx's messages and help texts tell a user to pass exists.
- Dependencies point one way: cli -> stages -> pipeline, shards -> ground floor.
- A checkpointing mode's name is spelled in its registry only; everyone else asks the mode object.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import typer

from cogvx import runs
from cogvx.cli import app
from cogvx.pipeline.speed.checkpointing import MODES
from cogvx.shards import paths

SRC = Path(__file__).resolve().parents[1] / "src" / "cogvx"
OWNERS = {SRC / "runs.py", SRC / "shards" / "paths.py"}

# Names unique enough to be searched anywhere inside a string; bare words only as a whole literal or path part.
DISTINCT = [
    runs.CONFIG_JSON,
    runs.CONFIG_TOML,
    runs.METRICS,
    runs.LORA_WEIGHTS,
    runs.MODEL_CARD,
    runs.LOSS_CURVE,
    runs.REPORT,
    runs.SHEET,
    runs.CHECKPOINT_STATE,
    runs.CHECKPOINT_LORA,
    runs.LOCK,
    paths.MANIFEST,
    paths.SKIPPED,
    paths.VALIDATION_PROMPTS,
    paths.PARTS,
    paths.DAMAGED_SUFFIX,
    "checkpoint-",
    "shard-r",
    "shards.r",
    "skipped.r",
    "result.r",
]
WORDS = [runs.VALIDATION, runs.LOGS, "step-", "sample-"]
# A diffusers model folder is not a run folder: its components' config.json is the model's own file.
ALLOWED = {("pipeline/models.py", runs.CONFIG_JSON), ("pipeline/tiny.py", runs.CONFIG_JSON)}

# Flags of the launchers and tools cogvx's messages point to (accelerate, torchrun, pip).
OTHER_TOOLS_FLAGS = {"--multi-gpu", "--num-processes", "--num_processes", "--nproc-per-node", "--nnodes", "--upgrade"}
OTHER_TOOLS_FLAGS |= {"--revision"}  # `hf download ID --revision REV`, for a hub model not in the cache


def _modules() -> list[Path]:
    return sorted(p for p in SRC.rglob("*.py"))


def _docstrings(tree: ast.AST) -> set[int]:
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                found.add(id(first.value))
    return found


def _strings(path: Path, with_docstrings: bool = False) -> list[tuple[int, str]]:
    """(line, text) of every string constant in a module, f-string parts included."""
    tree = ast.parse(path.read_text(), str(path))
    skip = set() if with_docstrings else _docstrings(tree)
    return [
        (node.lineno, node.value)
        for node in ast.walk(tree)
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in skip
    ]


def _hits(text: str) -> list[str]:
    found = [name for name in DISTINCT if re.search(rf"(?<![\w-]){re.escape(name)}", text)]
    for word in WORDS:
        if text == word or re.search(rf"(^|/){re.escape(word)}($|/|\{{|\d|N)", text):
            found.append(word)
    return found


def test_no_run_or_cache_folder_name_is_spelled_outside_its_owner():
    offences = []
    for path in _modules():
        if path in OWNERS:
            continue
        where = path.relative_to(SRC).as_posix()
        for line, text in _strings(path):
            for name in _hits(text):
                if (where, name) not in ALLOWED:
                    offences.append(f"{where}:{line}: {name!r} in {text!r}")
    assert not offences, "use cogvx.runs / cogvx.shards.paths instead:\n" + "\n".join(offences)


def test_the_scan_finds_what_it_looks_for():
    # The scan itself is code: it must flag the forms a path is spelled in, and leave prose alone.
    assert _hits("config.json") == [runs.CONFIG_JSON]
    assert _hits(".parts") == [paths.PARTS]
    assert runs.VALIDATION in _hits("validation")
    assert "step-" in _hits("step-{step:06d}") or "step-" in _hits("step-")
    assert "checkpoint-" in _hits("checkpoint-")
    assert _hits("the validation prompts of the cache") == []
    assert _hits("scheduler_config.json") == []


def _all_options() -> set[str]:
    options = set()

    def walk(command) -> None:
        for param in command.params:
            options.update(o for o in (*param.opts, *param.secondary_opts) if o.startswith("--"))
        for sub in getattr(command, "commands", {}).values():  # a group's subcommands
            walk(sub)

    walk(typer.main.get_command(app))
    return options


def test_every_flag_a_message_names_exists():
    known = _all_options() | OTHER_TOOLS_FLAGS
    named = {}
    for path in _modules():
        for line, text in _strings(path):  # messages and help texts (docstrings may name bench/ flags)
            for flag in re.findall(r"(?<![\w-])--[a-z][a-z0-9_-]*[a-z0-9]", text):
                named.setdefault(flag, f"{path.relative_to(SRC)}:{line}")
    missing = {flag: where for flag, where in named.items() if flag not in known}
    assert not missing, f"messages name flags no command has: {missing}"
    assert "--max-steps" in named and "--resume" in named  # the scan sees the messages


# Which top-level parts each part may import (besides itself and the ground floor).
GROUND = {"errors", "runs", "config", "files", "progress", "media", "hub", "__init__"}
MAY_IMPORT = {
    "shards": set(),
    "pipeline": {"shards"},
    "preprocess": {"pipeline", "shards"},
    "train": {"pipeline", "shards"},
    "sample": {"pipeline", "shards"},
    "render": {"pipeline", "shards"},
    "report": {"pipeline", "shards", "render"},
    "compare": {"shards", "report"},
    "cli": {"pipeline", "shards", "preprocess", "train", "sample", "render", "report", "compare"},
    "__main__": {"cli"},
}


def _part(path: Path) -> str:
    return path.relative_to(SRC).parts[0].removesuffix(".py")


def test_dependencies_point_one_way():
    offences = []
    for path in _modules():
        part = _part(path)
        allowed = MAY_IMPORT.get(part, set()) | GROUND | {part}
        if part in GROUND:
            allowed = GROUND
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("cogvx."):
                target = node.module.split(".")[1]
            elif isinstance(node, ast.ImportFrom) and node.module == "cogvx":
                target = None  # `from cogvx import runs`: each name is a ground-floor module or checked below
                for alias in node.names:
                    if alias.name not in allowed and alias.name != "__version__":
                        offences.append(f"{path.relative_to(SRC)}:{node.lineno} imports cogvx.{alias.name}")
            elif isinstance(node, ast.Import):
                target = next((a.name.split(".")[1] for a in node.names if a.name.startswith("cogvx.")), None)
            else:
                continue
            if target is not None and target not in allowed:
                offences.append(f"{path.relative_to(SRC)}:{node.lineno} imports cogvx.{target}")
    assert not offences, "\n".join(offences)


# --- checkpointing modes are objects (pipeline/speed/checkpointing.py), not strings switched on in places ---
REGISTRY = SRC / "pipeline" / "speed" / "checkpointing.py"
# "none" is also a word of other vocabularies (--report-to none): it counts only where compared with a mode.
MODE_WORDS = re.compile(r"checkpointing|\bmode\b")


def _mode_spellings(source: str) -> list[tuple[int, str]]:
    """(line, literal) of every place ``source`` spells a checkpointing mode's name, docstrings aside."""
    tree = ast.parse(source)
    skip = _docstrings(tree)
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value in set(MODES) - {"none"} and id(node) not in skip:
            found.append((node.lineno, node.value))
        elif isinstance(node, ast.Compare) and MODE_WORDS.search(ast.unparse(node)):
            literals = [n for n in ast.walk(node) if isinstance(n, ast.Constant) and n.value == "none"]
            found += [(n.lineno, n.value) for n in literals]
    return found


def test_checkpointing_modes_are_spelled_only_in_their_registry():
    offences = []
    for path in _modules():
        if path != REGISTRY:
            where = path.relative_to(SRC)
            offences += [f"{where}:{line}: {text!r}" for line, text in _mode_spellings(path.read_text())]
    assert not offences, "ask the mode object (checkpointing.MODES, Mode's attributes) instead:\n" + "\n".join(offences)
    assert _mode_spellings(REGISTRY.read_text())  # the registry itself does spell them


def test_the_mode_scan_finds_what_it_looks_for():
    assert _mode_spellings('if cfg.checkpointing == "swap": pass') == [(1, "swap")]
    assert _mode_spellings('runner = {"full": a, "selective": b}[name]') == [(1, "full"), (1, "selective")]
    assert _mode_spellings('if mode == "none": pass') == [(1, "none")]
    assert _mode_spellings('if mode in ("offload", "swap"): pass') == [(1, "offload"), (1, "swap")]
    assert _mode_spellings('if cfg.report_to != "none": pass') == []
    assert _mode_spellings('def f():\n    """Like swap, but full."""') == []
