"""The eval score: the training loss on held-out samples, computed so that it is a number, not a draw.

Each scored sample (``EvalSet.scored``) is noised at ``EVAL_TIMESTEPS`` fixed timesteps, the midpoints of
equal bands of the schedule ``[0, num_train_timesteps)``; the latent drawn from its cached moments, its
image latents (I2V, never dropped) and the noise come from a CPU generator seeded by (sample key,
timestep). One forward per (sample, timestep) pair, batch size 1, transformer only, in eval mode
(no LoRA dropout) and without gradients. So a LoRA scores the same on any run, batch size or device
count: the pairs are cut into one contiguous run per process, each process scores its own, and the
losses are gathered and summed in pair order (``math.fsum``, exactly rounded).

The score is the mean over all pairs; ``high``, ``mid`` and ``low`` are the means over the pairs whose
timestep lies in the top, middle and bottom third of the schedule (high noise: large timesteps). The
base model's score comes from the same function with the LoRA switched off (``base=True``).

What it adds to ``metrics.jsonl`` (``eval_fields``): to the line of the step it was computed after,

    "eval_loss", "eval_high", "eval_mid", "eval_low", "eval_set", "eval_samples", "eval_seconds"

and, for the base model (the LoRA switched off: what step 0 is), once per run folder and eval set, a line

    {"step": 0, "eval_base_loss", "eval_base_high", "eval_base_mid", "eval_base_low", "eval_set", ...}

(one line per step, as ``runs.keep_metrics_until`` keeps them on resume; no training line has step 0).

``eval_set`` is the score's identity (``identity``): a hash of the held-out keys and of the scoring protocol
(``PROTOCOL``, the timesteps): only scores with the same one compare.
``--keep-best`` keeps the LoRA of the lowest ``eval_loss`` in ``best/`` (``Best``, ``write_best``).
``Evaluator`` puts it together for the training loop: its samples, its cadence and the best LoRA.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import shutil
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from cogvx import files, runs
from cogvx.errors import CacheError, RunError
from cogvx.pipeline import lora
from cogvx.pipeline.objective import Objective
from cogvx.pipeline.speed import attention
from cogvx.shards import Manifest, read_shard
from cogvx.shards.manifest import IMAGE_MOMENTS
from cogvx.shards.store import Store
from cogvx.train.heldout import EvalSet

EVAL_TIMESTEPS = 6  # per sample: two per band (BANDS); changing it changes every score (and ``identity``)
# The version of how a pair is scored (its draws, its loss): a change that alters any score bumps it, so
# scores from before never compare as equal.
PROTOCOL = 1
BANDS = ("low", "mid", "high")  # thirds of the schedule, from the least noise to the most
PREFIX, BASE_PREFIX = "eval_", "eval_base_"


@dataclass(frozen=True)
class Pair:
    key: str
    timestep: int


@dataclass(frozen=True)
class EvalSample:
    """One held-out sample's cached tensors, on the CPU, without a batch axis."""

    moments: torch.Tensor  # [2C, F, H, W]
    prompt_embeds: torch.Tensor  # [L, D]
    image_moments: torch.Tensor | None = None  # [2C, 1, H, W], image-to-video caches


@dataclass(frozen=True)
class Score:
    loss: float
    bands: dict[str, float]  # BANDS -> mean loss (NaN for a band without timesteps)
    samples: int
    pairs: int
    seconds: float = 0.0


def timesteps(num_train_timesteps: int, count: int | None = None) -> list[int]:
    """The midpoints of ``count`` (default ``EVAL_TIMESTEPS``) equal bands of ``[0, num_train_timesteps)``."""
    count = EVAL_TIMESTEPS if count is None else count
    edges = [band * num_train_timesteps // count for band in range(count + 1)]
    return [(low + high) // 2 for low, high in zip(edges, edges[1:], strict=False)]


def identity(eval_set: EvalSet, num_train_timesteps: int) -> str:
    """What a score's ``eval_set`` field says: sha256 over the protocol, the timesteps and the held-out keys.

    Two scores with the same identity were computed the same way on the same samples, so they compare.
    """
    protocol = f"cogvx-eval-protocol:{PROTOCOL}:{timesteps(num_train_timesteps)}"
    return hashlib.sha256("\n".join([protocol, *sorted(eval_set.keys)]).encode()).hexdigest()


def band(timestep: int, num_train_timesteps: int) -> str:
    return BANDS[min(len(BANDS) - 1, timestep * len(BANDS) // num_train_timesteps)]


def pairs(keys: Iterable[str], num_train_timesteps: int) -> list[Pair]:
    """Every (sample, timestep) pair scored, in the one order all processes use."""
    steps = timesteps(num_train_timesteps)
    return [Pair(key, t) for key in sorted(keys) for t in steps]


def pair_seed(key: str, timestep: int) -> int:
    """A 63-bit seed for one pair's draws: the key and the timestep alone, so every run draws the same."""
    digest = hashlib.sha256(f"cogvx-eval:{key}:{timestep}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def share(count: int, rank: int, world_size: int) -> range:
    """The pairs one process scores: a contiguous run, so it reads only the samples of its own pairs."""
    return range(rank * count // world_size, (rank + 1) * count // world_size)


def load_samples(store: Store, manifest: Manifest, keys: Iterable[str]) -> dict[str, EvalSample]:
    """The tensors of ``keys``, read (sha256 verified) from the shards of ``manifest`` that hold them."""
    wanted = set(keys)
    found: dict[str, EvalSample] = {}
    for record in manifest.shards:
        if not wanted.intersection(entry.key for entry in record.live_samples()):
            continue
        for sample in read_shard(store, record):
            if sample.key in wanted:
                t = sample.tensors
                found[sample.key] = EvalSample(t["moments"], t["prompt_embeds"], t.get(IMAGE_MOMENTS))
    missing = sorted(wanted - set(found))
    if missing:
        raise CacheError(
            f"The eval samples {', '.join(missing[:3])} are not in {store.location}; the manifest changed while "
            "the run read it. Start the run again."
        )
    return found


@contextlib.contextmanager
def scoring(model: torch.nn.Module, base: bool = False) -> Iterator[None]:
    """Eval mode, no gradients, bf16 attention (never ``--fp8-attention``'s), and the LoRA switched off for ``base``;
    the model is left as it was found."""
    training = model.training
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    base = base and bool(getattr(model, "peft_config", None))  # without a LoRA the model is the base already
    model.eval()
    try:
        with torch.no_grad(), attention.bf16_forwards(model):
            if base:
                model.disable_adapters()
            try:
                yield
            finally:
                if base:
                    model.enable_adapters()
    finally:
        model.train(training)
        for p in model.parameters():  # peft's enable_adapters marks the adapter trainable: undo it where it was not
            p.requires_grad_(id(p) in trainable)


def pair_losses(
    model: torch.nn.Module,
    objective: Objective,
    samples: dict[str, EvalSample],
    all_pairs: Sequence[Pair],
    indices: Iterable[int],
    *,
    compute_dtype: torch.dtype,
    device: torch.device | str,
    autocast: Callable[[], Any] = contextlib.nullcontext,
) -> list[tuple[int, float]]:
    """(pair index, loss) of each pair in ``indices``: one forward each, batch size 1. Call inside ``scoring``."""
    out = []
    for index in indices:
        pair = all_pairs[index]
        sample = samples[pair.key]
        generator = torch.Generator("cpu").manual_seed(pair_seed(pair.key, pair.timestep))
        image = None if sample.image_moments is None else sample.image_moments.unsqueeze(0)
        with autocast():
            loss = objective.loss_at(
                model,
                sample.moments.unsqueeze(0),
                sample.prompt_embeds.unsqueeze(0).to(device),
                torch.tensor([pair.timestep], dtype=torch.long),
                generator,
                compute_dtype,
                image_moments=image,
            )
        out.append((index, float(loss)))
    return out


def summarise(losses: Iterable[tuple[int, float]], all_pairs: Sequence[Pair], num_train_timesteps: int) -> Score:
    """The score from every pair's loss (from all processes, in any order), reduced in pair order."""
    by_index: dict[int, float] = {}
    for index, loss in losses:
        if index in by_index:
            raise RuntimeError(f"Eval pair {index} was scored twice; the processes' shares overlap.")
        by_index[index] = loss
    if sorted(by_index) != list(range(len(all_pairs))):
        raise RuntimeError(f"{len(by_index)} of {len(all_pairs)} eval pairs were scored; the shares miss some.")
    ordered = [by_index[i] for i in range(len(all_pairs))]
    bands = {}
    for name in BANDS:
        chosen = [
            loss for loss, p in zip(ordered, all_pairs, strict=True) if band(p.timestep, num_train_timesteps) == name
        ]
        bands[name] = math.fsum(chosen) / len(chosen) if chosen else math.nan
    mean = math.fsum(ordered) / len(ordered) if ordered else math.nan
    return Score(mean, bands, len({p.key for p in all_pairs}), len(all_pairs))


def score(
    model: torch.nn.Module,
    objective: Objective,
    samples: dict[str, EvalSample],
    all_pairs: Sequence[Pair],
    *,
    compute_dtype: torch.dtype,
    device: torch.device | str,
    rank: int = 0,
    world_size: int = 1,
    gather: Callable[[list], list] | None = None,
    autocast: Callable[[], Any] = contextlib.nullcontext,
    base: bool = False,
) -> Score:
    """This process's share of ``all_pairs`` scored, every process's gathered, and the score (on every process).

    ``model``: the unwrapped transformer (no DDP wrapper: processes run different numbers of forwards).
    ``samples`` must hold the keys of this process's share (``share``); ``gather`` (accelerate's
    ``gather_object``) joins the processes' lists when ``world_size`` > 1. ``base``: the LoRA switched off.
    """
    started = time.perf_counter()
    mine = share(len(all_pairs), rank, world_size)
    with scoring(model, base):
        losses = pair_losses(
            model, objective, samples, all_pairs, mine, compute_dtype=compute_dtype, device=device, autocast=autocast
        )
    if world_size > 1:
        if gather is None:
            raise ValueError("Scoring on several processes needs their gather function.")
        losses = gather(losses)
    result = summarise(losses, all_pairs, len(objective.alphas_cumprod))
    return Score(result.loss, result.bands, result.samples, result.pairs, time.perf_counter() - started)


class Evaluator:
    """The eval score as a training component: it owns its samples, its cadence and ``--keep-best``.

    Built on every process after the objective (each reads only the samples of its own share of the pairs);
    ``base_fields`` once at the start, ``after_step`` after every optimizer step. Every process must make the
    same calls (the losses are gathered); only process 0 writes ``best/``.
    """

    def __init__(
        self,
        eval_set: EvalSet,
        store: Store,
        manifest: Manifest,
        objective: Objective,
        *,
        every: int,
        compute_dtype: torch.dtype,
        device: torch.device | str,
        rank: int = 0,
        world_size: int = 1,
        gather: Callable[[list], list] | None = None,
        autocast: Callable[[], Any] = contextlib.nullcontext,
        keep_best: Path | None = None,  # the run folder, to keep the best LoRA in its best/
    ):
        self.eval_set, self.objective, self.every, self.keep_best = eval_set, objective, every, keep_best
        self.pairs = pairs(eval_set.scored, len(objective.alphas_cumprod))
        mine = share(len(self.pairs), rank, world_size)
        self.samples = load_samples(store, manifest, {self.pairs[i].key for i in mine})
        self.options = dict(
            compute_dtype=compute_dtype,
            device=device,
            rank=rank,
            world_size=world_size,
            gather=gather,
            autocast=autocast,
        )
        self.rank = rank
        self.identity = identity(eval_set, len(objective.alphas_cumprod))
        self.best = Best(self.identity)  # a checkpoint component, for --keep-best

    def score(self, model: torch.nn.Module, base: bool = False) -> Score:
        return score(model, self.objective, self.samples, self.pairs, base=base, **self.options)

    def due(self, step: int, last: bool) -> bool:
        return bool(self.every) and (step % self.every == 0 or last)

    def base_fields(self, model: torch.nn.Module) -> dict[str, Any]:
        """The base model's score as the fields of its line, ``{"step": 0, ...}`` (see the module docstring)."""
        return {"step": 0} | eval_fields(self.score(model, base=True), self.identity, base=True)

    def after_step(self, model: torch.nn.Module, step: int, last: bool) -> dict[str, Any]:
        """The fields to add to ``step``'s metrics line: the score when one is due, else none.

        With ``keep_best``, a score lower than every earlier one writes the LoRA to ``best/``.
        """
        if not self.due(step, last):
            return {}
        result = self.score(model)
        if self.best.update(result.loss, step) and self.keep_best is not None and self.rank == 0:
            write_best(self.keep_best, model, self.best)
        return eval_fields(result, self.identity)


# --- metrics.jsonl ---


def eval_fields(result: Score, eval_set: str, base: bool = False) -> dict[str, Any]:
    """The fields a score adds to a line of metrics.jsonl (the base model's under ``eval_base_``)."""
    prefix = BASE_PREFIX if base else PREFIX
    fields = {f"{prefix}loss": result.loss} | {f"{prefix}{name}": result.bands[name] for name in reversed(BANDS)}
    return fields | {"eval_set": eval_set, "eval_samples": result.samples, "eval_seconds": result.seconds}


def eval_records(records: Iterable[dict[str, Any]], eval_set: str, base: bool = False) -> list[dict[str, Any]]:
    """The lines of metrics.jsonl (``runs.read_metrics``) holding a score on ``eval_set``, by step."""
    name = f"{BASE_PREFIX if base else PREFIX}loss"
    found = [r for r in records if r.get("eval_set") == eval_set and isinstance(r.get(name), (int, float))]
    return sorted(found, key=lambda r: r["step"])


def needs_base(records: Iterable[dict[str, Any]], eval_set: str) -> bool:
    """Whether the run has yet to score the base model on ``eval_set`` (a fresh run, or one resumed from a run
    that scored none)."""
    return not eval_records(records, eval_set, base=True)


@dataclass(frozen=True)
class Summary:
    """A run's scores on one eval set, as the end message and the model card tell them."""

    loss: float  # the last score
    step: int
    best_loss: float
    best_step: int
    base_loss: float | None  # the base model's (LoRA off), None when the run has none
    samples: int
    eval_set: str  # ``identity``: the scores of this set alone

    def line(self) -> str:
        """ "eval loss 0.412 at step 1200, best; base 0.455" (or the best one after it when the last is not)."""
        text = f"eval loss {self.loss:.4g} at step {self.step}"
        if self.best_step == self.step:
            text += ", best"
        else:
            text += f" (best {self.best_loss:.4g} at step {self.best_step})"
        return text + (f"; base {self.base_loss:.4g}" if self.base_loss is not None else "")


def summary(records: Iterable[dict[str, Any]]) -> Summary | None:
    """The scores of ``records`` (metrics.jsonl) on the eval set of their last score; None before any."""
    records = list(records)
    scored = [r for r in records if isinstance(r.get(f"{PREFIX}loss"), (int, float))]
    if not scored:
        return None
    last = max(scored, key=lambda r: r["step"])
    on_set = [r for r in eval_records(records, last.get("eval_set")) if math.isfinite(r[f"{PREFIX}loss"])]
    best = min(on_set, key=lambda r: (r[f"{PREFIX}loss"], r["step"]), default=last)
    base = eval_records(records, last.get("eval_set"), base=True)
    return Summary(
        loss=last[f"{PREFIX}loss"],
        step=last["step"],
        best_loss=best[f"{PREFIX}loss"],
        best_step=best["step"],
        base_loss=base[-1][f"{BASE_PREFIX}loss"] if base else None,
        samples=int(last.get("eval_samples", 0)),
        eval_set=str(last.get("eval_set")),
    )


def tracker_scalars(fields: dict[str, Any]) -> dict[str, float]:
    """``eval_*`` fields as tracker scalars ``eval/loss``, ``eval/high``, ... (``eval/base_loss`` for the base)."""
    return {
        f"eval/{name.removeprefix(PREFIX)}": value
        for name, value in fields.items()
        if name.startswith(PREFIX) and name not in ("eval_set", "eval_samples") and isinstance(value, (int, float))
    }


# --- --keep-best ---


class Best:
    """The lowest eval score so far and its step, as a checkpoint component (``state_dict``/``load_state_dict``).

    A checkpoint scored on another eval set (another cache or hold-out request) is no comparison: its
    record is kept in ``discarded`` and the run starts over from no best.
    """

    def __init__(self, eval_set: str):
        self.eval_set = eval_set
        self.loss = math.inf
        self.step: int | None = None
        self.discarded: dict[str, Any] | None = None

    def update(self, loss: float, step: int) -> bool:
        """Record ``loss`` at ``step``; True when it is the best so far (strictly lower; NaN never is)."""
        if not loss < self.loss:
            return False
        self.loss, self.step = loss, step
        return True

    def state_dict(self) -> dict[str, Any]:
        return {"eval_set": self.eval_set, "eval_loss": self.loss, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("eval_set") != self.eval_set:
            self.loss, self.step, self.discarded = math.inf, None, dict(state)
            return
        self.loss, self.step, self.discarded = float(state["eval_loss"]), state["step"], None


def write_best(run: Path, transformer: torch.nn.Module, best: Best) -> Path:
    """The LoRA of ``transformer`` as ``best/`` in ``run``, with ``best``'s score, atomically.

    Written into a hidden staging folder, fsynced, and renamed into place (the old ``best/`` renamed away and
    deleted first), so ``best/`` is always a complete LoRA. A write that fails leaves the old one and raises
    a one-line RunError.
    """
    run = Path(run)
    final = runs.best(run)
    staging = runs.best_staging(run, f"{socket.gethostname()}-{os.getpid()}")
    try:
        for leftover in runs.best_leftovers(run):  # the run folder is this run's alone (its lock)
            shutil.rmtree(leftover, ignore_errors=True)
        staging.mkdir(parents=True)
        weights = lora.save_lora(transformer, staging)
        files.fsync_folder(weights)
        files.write_bytes_atomic(runs.best_score(staging), json.dumps(best.state_dict(), indent=1).encode())
        files.fsync_folder(staging)
        if final.exists():
            doomed = runs.checkpoint_discarded(final)
            shutil.rmtree(doomed, ignore_errors=True)
            os.replace(final, doomed)
            shutil.rmtree(doomed)
        os.replace(staging, final)
        files.fsync_folder(run)
    except BaseException as err:
        shutil.rmtree(staging, ignore_errors=True)
        if isinstance(err, OSError):
            raise RunError(
                f"Could not write the best LoRA to {final}: {err.strerror or err}. Free space there (or choose a "
                "writable --output); the checkpoints in the run folder are intact."
            ) from err
        raise
    return final


def read_best(run: Path) -> dict[str, Any] | None:
    """The score ``best/`` was kept for (``Best.state_dict``), None when the run has no best LoRA."""
    path = runs.best_score(runs.best(run))
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RunError(f"{path} is not valid JSON ({err}); delete {runs.best(run)} and train again.") from err
