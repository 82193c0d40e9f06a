"""``cogvx preprocess``: videos and captions in, a cache of latent moments and prompt embeddings out."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from cogvx import __version__
from cogvx.pipeline import models
from cogvx.pipeline.encode import encode_prompts, encode_video_moments
from cogvx.preprocess.sources import Clip, discover
from cogvx.preprocess.video import FrameSpec, SkipClip, largest_4k1, read_clip
from cogvx.progress import progress_bar
from cogvx.shards import CacheError, Manifest, Sample, SampleEntry, ShardRecord, ShardWriter
from cogvx.shards.io import file_sha256

SKIPPED_NAME = "skipped.jsonl"
VALIDATION_NAME = "validation_prompts.safetensors"


@dataclass
class PreprocessConfig:
    data: Path
    output: Path = Path("shards")
    model: str = models.DEFAULT_MODEL
    height: int | None = None  # default: the model's native size, from its transformer config
    width: int | None = None
    max_frames: int = 49
    min_frames: int = 5
    fps: float = 8.0
    skip_frames_start: int = 0
    skip_frames_end: int = 0
    resize: str = "crop"
    id_token: str | None = None
    caption_column: str = "prompts.txt"
    video_column: str = "videos.txt"
    dtype: str = "bf16"
    device: str | None = None
    text_batch_size: int = 16
    workers: int = 2
    shard_max_mb: int = 512
    validation_prompts: tuple[str, ...] = ()

    def __post_init__(self):
        self.data, self.output = Path(self.data), Path(self.output)
        models.parse_dtype(self.dtype)
        if (self.height or 16) % 16 or (self.width or 16) % 16:
            raise ValueError(f"--height/--width must be multiples of 16 (got {self.height}x{self.width}).")
        if largest_4k1(self.max_frames) != self.max_frames:
            raise ValueError(f"--max-frames must be of the form 4k+1 (got {self.max_frames}; try 49 or 81).")
        if not 1 <= self.min_frames <= self.max_frames:
            raise ValueError(f"--min-frames must be between 1 and --max-frames (got {self.min_frames}).")
        if self.resize not in ("crop", "stretch"):
            raise ValueError(f"--resize must be 'crop' or 'stretch' (got {self.resize!r}).")
        if self.fps <= 0:
            raise ValueError(f"--fps must be positive (got {self.fps}).")

    @property
    def frame_spec(self) -> FrameSpec:
        return FrameSpec(
            self.height,
            self.width,
            self.max_frames,
            self.min_frames,
            self.fps,
            self.skip_frames_start,
            self.skip_frames_end,
            self.resize,
        )

    def cache_params(self) -> dict:
        """Everything that changes what a sample holds: a cache is made with exactly one set."""
        return {**asdict(self.frame_spec), "id_token": self.id_token, "dtype": self.dtype}


@dataclass
class PreprocessResult:
    encoded: int = 0
    already_cached: int = 0
    skipped: Counter = field(default_factory=Counter)
    truncated_captions: int = 0
    seconds: float = 0.0
    manifest: Manifest | None = None


class _ClipReader(torch.utils.data.Dataset):
    """Hashes and decodes one clip per item in DataLoader workers; failures come back as values."""

    def __init__(self, clips: list[Clip], spec: FrameSpec, done: set[tuple[str, str]]):
        self.clips, self.spec, self.done = clips, spec, done

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict:
        clip = self.clips[index]
        try:
            content_hash = file_sha256(clip.path)
        except OSError as err:
            return {"index": index, "skip": f"cannot read file ({err.strerror or err})"}
        if (clip.source, content_hash) in self.done:
            return {"index": index, "done": True}
        if not clip.caption:
            return {"index": index, "skip": "missing or empty caption"}
        try:
            frames, info = read_clip(str(clip.path), self.spec)
        except SkipClip as err:
            return {"index": index, "skip": str(err)}
        return {"index": index, "hash": content_hash, "frames": torch.from_numpy(frames), "info": info}


class _PromptBank:
    """Encodes captions in de-duplicated batches, a little ahead of the clips that need them."""

    def __init__(self, captions: list[str], encode: Callable[[list[str]], tuple[torch.Tensor, list[bool]]], batch: int):
        self.captions, self.encode, self.batch = captions, encode, batch
        self.cache: dict[str, tuple[torch.Tensor, bool]] = {}

    def get(self, index: int) -> tuple[torch.Tensor, bool]:
        caption = self.captions[index]
        if caption not in self.cache:
            upcoming = list(dict.fromkeys(c for c in self.captions[index : index + 4 * self.batch]))
            todo = [c for c in upcoming if c not in self.cache][: self.batch]
            embeds, truncated = self.encode(todo)
            for text, emb, cut in zip(todo, embeds, truncated, strict=True):
                self.cache[text] = (emb.cpu(), cut)
            while len(self.cache) > 8 * self.batch:
                self.cache.pop(next(iter(self.cache)))
        return self.cache[caption]


def sample_key(source: str, content_hash: str, window: int) -> str:
    return hashlib.sha256(f"{source}\0{content_hash}\0{window}".encode()).hexdigest()[:24]


def _open_cache(cfg: PreprocessConfig, producer: dict, params: dict) -> Manifest:
    """The existing manifest when it was made the same way, a fresh one otherwise; refuse a mismatch."""
    try:
        manifest = Manifest.load(cfg.output)
    except CacheError:
        if (cfg.output / "manifest.json").exists():
            raise
        schema = {
            "moments": "VAE posterior [2C, F, H, W]: mean then log-variance on axis 0, unscaled",
            "prompt_embeds": f"T5 last hidden state [{models.MAX_TEXT_TOKENS}, D], pads included",
            "json": "source, content_hash, caption, frame_indices, fps, size, bucket, ...",
        }
        return Manifest(producer=producer, params=params, schema=schema)
    if manifest.params != params or manifest.producer["encoders"] != producer["encoders"]:
        raise ValueError(
            f"{cfg.output} already holds a cache made with other settings "
            f"(stored: model {manifest.producer.get('model')}, {manifest.params}; now: model {cfg.model}, {params}). "
            "Write to a new --output folder, or re-run with the stored settings to add to it."
        )
    return manifest


def run(cfg: PreprocessConfig, show_progress: bool = False) -> PreprocessResult:
    started = time.time()
    clips = discover(cfg.data, cfg.caption_column, cfg.video_column)
    if not clips:
        raise ValueError(f"No videos found under {cfg.data} (looked for {', '.join(sorted(_exts()))}).")
    if cfg.id_token:
        clips = [Clip(c.path, f"{cfg.id_token} {c.caption}".strip() if c.caption else "", c.source) for c in clips]

    info = models.ModelInfo.read(cfg.model)
    cfg.height = cfg.height or info.native_size[0]
    cfg.width = cfg.width or info.native_size[1]
    producer = {
        "tool": "cogvx",
        "version": __version__,
        "model": cfg.model,
        "encoders": info.encoder_identity(),
    }
    params = cfg.cache_params()
    cfg.output.mkdir(parents=True, exist_ok=True)
    manifest = _open_cache(cfg, producer, params)
    for stale in cfg.output.glob("*.tar.tmp"):
        stale.unlink()  # left by an interrupted run; never listed, so never read
    done = {(s.source, s.content_hash) for shard in manifest.shards for s in shard.samples}

    device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = models.parse_dtype(cfg.dtype)
    vae = models.load_vae(info.source, dtype, device).eval()
    tokenizer, text_encoder = models.load_text_encoder(info.source, dtype, device)

    def encode_text(texts: list[str]):
        encoding = encode_prompts(tokenizer, text_encoder, texts)
        return encoding.embeds, encoding.truncated

    if cfg.validation_prompts:
        save_validation_prompts(cfg.output, manifest, list(cfg.validation_prompts), encode_text)
    prompts = _PromptBank([c.caption for c in clips], encode_text, cfg.text_batch_size)
    result = PreprocessResult(manifest=manifest)

    def commit(record: ShardRecord) -> None:
        manifest.shards.append(record)
        manifest.save(cfg.output)

    writer = ShardWriter(cfg.output, "shard-r00", commit, max_bytes=cfg.shard_max_mb * 2**20)
    loader = torch.utils.data.DataLoader(
        _ClipReader(clips, cfg.frame_spec, done),
        batch_size=None,
        num_workers=cfg.workers,
        pin_memory=device.type == "cuda",
        prefetch_factor=4 if cfg.workers else None,
    )
    skipped_log = open(cfg.output / SKIPPED_NAME, "a", encoding="utf-8")
    bar = progress_bar(show_progress, "preprocess", len(clips), "{task.fields[rate]:.2f} clips/s", rate=0.0)
    with bar as update:
        try:
            for position, item in enumerate(loader, 1):
                clip = clips[item["index"]]
                if "skip" in item:
                    result.skipped[item["skip"].split(" (")[0].split(":")[0]] += 1
                    skipped_log.write(json.dumps({"source": clip.source, "reason": item["skip"]}) + "\n")
                    skipped_log.flush()
                elif item.get("done"):
                    result.already_cached += 1
                else:
                    moments = encode_video_moments(vae, item["frames"][None])[0]
                    embeds, truncated = prompts.get(item["index"])
                    result.truncated_captions += truncated
                    meta = {
                        "source": clip.source,
                        "content_hash": item["hash"],
                        "caption": clip.caption,
                        "caption_truncated": truncated,
                        "window": 0,
                        "latent_shape": list(moments.shape),
                        "frames": len(item["info"]["frame_indices"]),
                        **item["info"],
                    }
                    bucket = f"{meta['frames']}x{cfg.height}x{cfg.width}"
                    meta["bucket"] = bucket
                    key = sample_key(clip.source, item["hash"], 0)
                    writer.write(
                        Sample(key, {"moments": moments, "prompt_embeds": embeds}, meta),
                        SampleEntry(key, clip.source, item["hash"], bucket),
                    )
                    result.encoded += 1
                update(position, rate=position / max(time.time() - started, 1e-9))
            writer.flush()
        except BaseException:
            writer.abandon()
            raise
        finally:
            skipped_log.close()
    if not manifest.shards:
        manifest.save(cfg.output)
    result.seconds = time.time() - started
    if show_progress:
        print_summary(result, cfg.output)
    if result.encoded + result.already_cached == 0:
        raise ValueError(
            f"Nothing usable in {cfg.data}: all {len(clips)} clips were skipped "
            f"(reasons in {cfg.output / SKIPPED_NAME})."
        )
    return result


def print_summary(result: PreprocessResult, output: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title="preprocess summary", show_header=False)
    table.add_row("encoded now", str(result.encoded))
    table.add_row("already in cache", str(result.already_cached))
    for reason, count in result.skipped.most_common():
        table.add_row(f"skipped: {reason}", str(count))
    if result.truncated_captions:
        table.add_row("captions cut at 226 tokens", str(result.truncated_captions))
    for bucket, count in result.manifest.bucket_counts().items():
        table.add_row(f"bucket {bucket}", str(count))
    table.add_row("size on disk", f"{result.manifest.total_bytes / 2**20:.1f} MiB")
    table.add_row("time", f"{result.seconds:.1f} s")
    table.add_row("cache", str(output))
    Console(stderr=True).print(table)


def save_validation_prompts(folder: Path, manifest: Manifest, prompts: list[str], encode) -> None:
    """Store the embeddings of validation prompts, and of the empty prompt (for guidance), in the cache.

    Training samples validation latents from these without loading T5.
    """
    from safetensors.torch import save_file

    embeds, _ = encode([*prompts, ""])
    path = Path(folder) / VALIDATION_NAME
    tmp = path.with_suffix(".tmp")
    tensors = {
        "prompt_embeds": embeds[:-1].contiguous().cpu(),
        "negative_prompt_embeds": embeds[-1:].contiguous().cpu(),
    }
    save_file(tensors, tmp, metadata={"prompts": json.dumps(prompts)})
    os.replace(tmp, path)
    manifest.extras["validation"] = {"file": VALIDATION_NAME, "prompts": prompts, "sha256": file_sha256(path)}
    manifest.save(folder)


def _exts() -> set[str]:
    from cogvx.preprocess.sources import VIDEO_EXTENSIONS

    return VIDEO_EXTENSIONS


def default_workers() -> int:
    return min(4, os.cpu_count() or 1)
