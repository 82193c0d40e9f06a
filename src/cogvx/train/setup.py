"""Setting a run up before any weights load: the cache, the model, the eval set, the settings, every check.

``prepare`` reads the cache's manifest and the model's configs, chooses what the eval score is computed
on, resolves the settings the run records (``--epochs`` into steps), and refuses what cannot train:
a resume that changes what it may not, a cache that does not fit the model, too few samples left.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from cogvx import config as configfile
from cogvx.errors import CogvxError, ConfigError
from cogvx.pipeline import compat, models
from cogvx.shards import Manifest, ShardRecord, paths
from cogvx.shards.store import Store, display, open_store
from cogvx.train import heldout
from cogvx.train.checkpointer import CheckpointManager
from cogvx.train.config import TrainConfig
from cogvx.train.data import check_batch_fits, unit_count
from cogvx.train.heldout import EvalSet


@dataclass
class Setup:
    """What a run trains on and with, decided once, before the transformer loads."""

    cfg: TrainConfig  # ``--epochs`` resolved into ``max_steps``
    store: Store
    manifest: Manifest
    model_name: str
    info: models.ModelInfo
    train_shards: list[ShardRecord]  # never a held-out sample
    resolved: dict[str, Any]  # the settings in effect, as the run records them and a checkpoint compares them
    held_out: str  # the held-out samples' hash, "" for none
    eval_set: EvalSet | None
    eval_store: Store
    eval_manifest: Manifest


def prepare(accelerator, cfg: TrainConfig, checkpoints: CheckpointManager) -> Setup:
    """Read, choose and check all a run needs before its weights (``checkpoints`` knows where it resumes)."""
    world = accelerator.num_processes
    # A remote cache is streamed (shards verified as they are copied); its display form is what the run records.
    store = open_store(cfg.shards, cache_dir=cfg.cache_dir)
    manifest = Manifest.load(store)
    model_name, info = _model(cfg, store, manifest)
    eval_set, eval_store, eval_manifest, eval_line = choose_eval_set(cfg, store, manifest)
    originals = heldout.training_originals(manifest, eval_set)  # what --epochs counts
    held_out = eval_set.keys_hash if eval_set is not None and not eval_set.separate else ""
    # What the run records and a checkpoint compares on resume: the settings in effect (never a URL's credentials).
    settings = configfile.as_dict(cfg.steps_for(originals, world)) | {"shards": store.location}
    if eval_set is not None and eval_set.separate:
        settings["eval_shards"] = eval_store.location
    resolved = settings | {"model": model_name}
    resolved |= {f"model_{key}": value for key, value in info.recorded().items() if key != "model"}
    checkpoints.check_settings(resolved, held_out)  # before any other check: a resume says all it changes
    compat.check_cache_fits(manifest, info, store.location)
    info.check_task()
    compat.check_image_latents(manifest, info, store.location)
    transformer_config = info.read_config("transformer")
    compat.check_packable(manifest, info, transformer_config, store.location)
    compat.check_mirrors(manifest, cfg.random_flip, display(cfg.shards))
    if eval_set is not None and eval_set.separate:
        check_eval_cache(eval_manifest, info, transformer_config, eval_store.location)
    train_shards = heldout.training_shards(manifest.shards, eval_set)  # never a held-out sample, on any rank
    check_training_left(train_shards, eval_set, cfg.batch_size, world, store.location)
    if eval_line:
        accelerator.print(eval_line)
    warning = compat.frame_count_warning(manifest, info)
    if warning:
        accelerator.print(warning)
    if cfg.epochs is not None:
        epochs, cfg = cfg.epochs, cfg.steps_for(originals, world)
        counted = "samples not held out" if held_out else "samples"
        accelerator.print(
            f"--epochs {epochs:g}: {cfg.max_steps} steps ({originals} {counted}, "
            f"{cfg.batch_size * cfg.gradient_accumulation * world} per step)."
        )
    torch.backends.cuda.matmul.allow_tf32 = cfg.allow_tf32
    torch.backends.cudnn.allow_tf32 = cfg.allow_tf32
    return Setup(
        cfg, store, manifest, model_name, info, train_shards, resolved, held_out, eval_set, eval_store, eval_manifest
    )


def _model(cfg: TrainConfig, store: Store, manifest: Manifest) -> tuple[str, models.ModelInfo]:
    """The model trained (``--model``, else the cache's) and its facts, at the revision and variant in effect."""
    model_name = models.choose_model(cfg.model, (manifest.producer.get("model"), store.url(paths.MANIFEST)))
    from_cache = cfg.model is None  # the cache's model comes with the revision and variant it was read at
    info = models.ModelInfo.read(
        model_name,
        cfg.model_revision or (manifest.producer.get("revision") if from_cache else None),
        cfg.model_variant or (manifest.producer.get("variant") if from_cache else None),
    )
    return model_name, info


def choose_eval_set(
    cfg: TrainConfig, store: Store, manifest: Manifest
) -> tuple[EvalSet | None, Store, Manifest, str | None]:
    """What the eval score is computed on (None: no score), the cache it is read from, and the line to print.

    ``--eval-shards``: all of another cache, nothing held out; else, with ``--eval-every``, the clips of the
    training cache that ``--eval-holdout`` (or the default rule) holds out.
    """
    if cfg.eval_shards is not None:
        eval_store, eval_manifest, eval_set = heldout.separate_set(cfg.eval_shards, cfg.cache_dir)
        line = (
            f"Eval score on the {eval_set.clips} clips ({len(eval_set.scored)} samples) of {eval_store.location} "
            f"({heldout.flag(heldout.EVAL_SHARDS_FIELD)}); nothing is held out of training."
        )
        return eval_set, eval_store, eval_manifest, line
    if not cfg.eval_every:
        return None, store, manifest, None
    eval_set, line = heldout.choose(manifest, cfg.eval_holdout, store.location)
    if eval_set is None and cfg.keep_best:
        raise ConfigError(f"--keep-best keeps the LoRA of the lowest eval score, and this run has none. {line}")
    return eval_set, store, manifest, line


def check_eval_cache(manifest: Manifest, info: models.ModelInfo, transformer: dict[str, Any], location: str) -> None:
    """``--eval-shards``: the same checks as the training cache's, the message saying which cache it was."""
    try:
        compat.check_cache_fits(manifest, info, location)
        compat.check_image_latents(manifest, info, location)
        compat.check_packable(manifest, info, transformer, location)
    except CogvxError as err:
        raise type(err)(f"{heldout.flag(heldout.EVAL_SHARDS_FIELD)} {location}: {err}") from err


def check_training_left(
    shards: list[ShardRecord], eval_set: EvalSet | None, batch_size: int, world: int, location: str
) -> None:
    """The samples left to train on (held-out ones taken away) must fill one forward pass."""
    left, batch = unit_count(shards), batch_size * world
    if eval_set is not None and not eval_set.separate and left < batch:
        raise ConfigError(
            f"The {eval_set.clips} clips held out for the eval score leave {left} samples of {location} to train on, "
            f"fewer than the {batch} of one forward pass (--batch-size {batch_size} x {world} process(es)). Hold out "
            f"fewer ({heldout.flag(heldout.HOLDOUT_FIELD)} N, 0 for none), take a smaller --batch-size, or score a "
            f"cache of its own with {heldout.flag(heldout.EVAL_SHARDS_FIELD)} DIR."
        )
    check_batch_fits(shards, batch_size, world, location)
