"""``cogvx shards inspect`` and ``cogvx shards verify``: look into a cache folder without a model."""

from __future__ import annotations

import io
import json
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cogvx.shards.io import file_sha256, read_shard, verify
from cogvx.shards.manifest import MANIFEST_NAME, SKIPPED_NAME, CacheError, Manifest

STRIP_MEMBER = "jpg"  # the extra member holding a JPEG strip of a sample's sampled frames


@dataclass
class InspectConfig:
    folder: Path
    contact_sheet: Path | None = None  # write a PNG of the samples' frame strips here
    max_strips: int = 64

    def __post_init__(self):
        self.folder = Path(self.folder)
        if self.contact_sheet is not None:
            self.contact_sheet = Path(self.contact_sheet)
            if self.contact_sheet.suffix.lower() != ".png":
                raise ValueError(f"--contact-sheet {self.contact_sheet} must end in .png.")
        if self.max_strips < 1:
            raise ValueError(f"--max-strips must be at least 1 (got {self.max_strips}).")


@dataclass
class CacheSummary:
    folder: Path
    manifest: Manifest
    disk_bytes: int  # every file in the folder, not only the listed shards
    skipped: Counter = field(default_factory=Counter)
    contact_sheet: Path | None = None
    strips: int = 0

    def rows(self) -> list[tuple[str, str]]:
        m = self.manifest
        rows = [
            ("model", str(m.producer.get("model"))),
            ("written by", f"{m.producer.get('tool', '?')} {m.producer.get('version', '?')}"),
            ("shards", str(len(m.shards))),
            ("samples", str(m.sample_count)),
        ]
        if m.excluded_count:
            rows.append(("replaced samples (not served)", str(m.excluded_count)))
        rows += [(f"bucket {bucket}", str(count)) for bucket, count in m.bucket_counts().items()]
        rows.append(("shards size", _mib(m.total_bytes)))
        rows.append(("size on disk", _mib(self.disk_bytes)))
        rows += [(f"skipped: {reason}", str(count)) for reason, count in self.skipped.most_common()]
        validation = m.extras.get("validation")
        if validation:
            rows.append(("validation prompts", str(len(validation.get("prompts", [])))))
        rows += [(f"param {key}", json.dumps(value)) for key, value in sorted(m.params.items())]
        rows += [(f"encoder {key}", str(value)) for key, value in sorted(m.producer.get("encoders", {}).items())]
        if self.contact_sheet:
            rows.append(("contact sheet", f"{self.contact_sheet} ({self.strips} strips)"))
        return rows


def inspect(cfg: InspectConfig) -> CacheSummary:
    manifest = Manifest.load(cfg.folder)
    disk = sum(p.stat().st_size for p in cfg.folder.rglob("*") if p.is_file())
    summary = CacheSummary(cfg.folder, manifest, disk, read_skipped(cfg.folder))
    if cfg.contact_sheet is not None:
        summary.strips = write_contact_sheet(cfg.folder, manifest, cfg.contact_sheet, cfg.max_strips)
        summary.contact_sheet = cfg.contact_sheet
    return summary


def read_skipped(folder: Path) -> Counter:
    """Skipped inputs of the last finished preprocessing run, counted by reason."""
    path = Path(folder) / SKIPPED_NAME
    counts: Counter = Counter()
    if path.is_file():
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                counts[json.loads(line).get("reason", "unknown")] += 1
    return counts


def write_contact_sheet(folder: Path, manifest: Manifest, path: Path, max_strips: int = 64) -> int:
    """A PNG with one row per sample: its source and bucket, then its frame strip. Returns the rows."""
    from PIL import Image, ImageDraw

    row_height, label_width, pad = 64, 320, 4
    rows: list[tuple[str, Image.Image]] = []
    for record in manifest.shards:
        if len(rows) >= max_strips:
            break  # enough rows: never read (and hash) the rest of a large cache
        for sample in read_shard(folder, record):
            if len(rows) >= max_strips:
                break
            data = sample.extras.get(STRIP_MEMBER)
            if data is None:
                continue
            strip = Image.open(io.BytesIO(data)).convert("RGB")
            scale = row_height / strip.height
            strip = strip.resize((max(1, round(strip.width * scale)), row_height))
            label = f"{sample.meta.get('source', sample.key)}\n{sample.meta.get('bucket', '')}"
            window = sample.meta.get("window")
            if window:
                label += f" window {window}"
            rows.append((label, strip))
    if not rows:
        raise ValueError(
            f"No sample in {folder} has a frame strip (.{STRIP_MEMBER} member); caches written before strips "
            "were stored have none. Re-run `cogvx preprocess` into a new folder to get them."
        )
    width = label_width + max(strip.width for _, strip in rows) + pad
    sheet = Image.new("RGB", (width, len(rows) * (row_height + pad) + pad), "white")
    draw = ImageDraw.Draw(sheet)
    for i, (label, strip) in enumerate(rows):
        top = pad + i * (row_height + pad)
        draw.multiline_text((pad, top + 4), _fit(label, 48), fill="black")
        sheet.paste(strip, (label_width, top))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(path)
    return len(rows)


@dataclass
class VerifyConfig:
    folder: Path
    deep: bool = True  # also parse every sample's tensors and metadata

    def __post_init__(self):
        self.folder = Path(self.folder)


@dataclass
class VerifyReport:
    shards: int
    samples: int
    problems: list[str]
    unlisted: list[str]  # shard files in the folder that the manifest does not list (never read)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_cache(cfg: VerifyConfig) -> VerifyReport:
    """Every shard against the manifest, and the side files the manifest names."""
    manifest = Manifest.load(cfg.folder)
    problems = verify(cfg.folder, manifest.shards, deep=cfg.deep)
    for name, extra in sorted(manifest.extras.items()):
        if not isinstance(extra, dict) or "file" not in extra:
            continue
        path = cfg.folder / extra["file"]
        if not path.is_file():
            problems.append(f"{path} ({name}) is listed in {MANIFEST_NAME} but missing")
        elif extra.get("sha256") and file_sha256(path) != extra["sha256"]:
            problems.append(f"{path} ({name}) does not match its sha256 in {MANIFEST_NAME}")
    listed = {record.name for record in manifest.shards}
    unlisted = sorted(p.name for p in cfg.folder.glob("*.tar") if p.name not in listed)
    return VerifyReport(len(manifest.shards), manifest.sample_count, problems, unlisted)


def _fit(text: str, width: int) -> str:
    return "\n".join(line if len(line) <= width else line[: width - 3] + "..." for line in text.splitlines())


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


__all__ = [
    "CacheError",
    "CacheSummary",
    "InspectConfig",
    "VerifyConfig",
    "VerifyReport",
    "inspect",
    "verify_cache",
    "write_contact_sheet",
]
