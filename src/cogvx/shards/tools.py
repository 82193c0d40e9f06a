"""``cogvx shards inspect``, ``verify`` and ``rebuild-manifest``: look into a cache folder without a model."""

from __future__ import annotations

import io
import json
import shlex
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from cogvx.errors import CacheError, ConfigError
from cogvx.files import sha256_of
from cogvx.media import contact_sheet, write_png
from cogvx.shards import paths
from cogvx.shards.manifest import Manifest, is_plain_name
from cogvx.shards.reader import read_shard
from cogvx.shards.rebuild import read_indexed_shard
from cogvx.shards.shardfile import file_sha256
from cogvx.shards.store import LocalStore, Store, display, is_remote, open_store
from cogvx.shards.verify import check_shards
from cogvx.stage_configs import InspectConfig, VerifyConfig

STRIP_MEMBER = "jpg"  # the extra member holding a JPEG strip of a sample's sampled frames
MAX_STRIP_PIXELS = 64 * 1 << 18  # 64 px high and up to 262144 px wide


@dataclass
class CacheSummary:
    folder: Path | str
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
        validation = m.extras.get(paths.VALIDATION_ENTRY)
        if validation:
            rows.append(("validation prompts", str(len(validation.get("prompts", [])))))
        rows += [(f"param {key}", json.dumps(value)) for key, value in sorted(m.params.items())]
        rows += [(f"encoder {key}", str(value)) for key, value in sorted(m.producer.get("encoders", {}).items())]
        if self.contact_sheet:
            rows.append(("contact sheet", f"{self.contact_sheet} ({self.strips} strips)"))
        return rows


def inspect(cfg: InspectConfig) -> CacheSummary:
    store = open_store(cfg.folder)
    manifest = Manifest.load(store)
    if isinstance(store, LocalStore):
        disk = sum(p.stat().st_size for p in store.folder.rglob("*") if p.is_file())
    else:  # the files directly under the prefix: a cache keeps nothing deeper
        disk = sum(size for name in store.list() if (size := store.size(name)) is not None)
    shown = store.folder if isinstance(store, LocalStore) else store.location
    summary = CacheSummary(shown, manifest, disk, read_skipped(store))
    if cfg.contact_sheet is not None:
        summary.strips = write_contact_sheet(store, manifest, cfg.contact_sheet, cfg.max_strips)
        summary.contact_sheet = cfg.contact_sheet
    return summary


MAX_SKIPPED_LINE = 1 << 20


def read_skipped(folder: Path | str | Store) -> Counter:
    """Skipped inputs of the last finished preprocessing run, counted by reason (streamed, line by line)."""
    store = open_store(folder)
    path = store.url(paths.SKIPPED)
    counts: Counter = Counter()
    try:
        f = store.open(paths.SKIPPED)
    except FileNotFoundError:
        return counts
    with f:
        for number, line in enumerate(iter(lambda: f.readline(MAX_SKIPPED_LINE + 1), b""), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line) if len(line) <= MAX_SKIPPED_LINE else None
            except (ValueError, RecursionError):
                row = None  # refused just below, with the line's number
            if not isinstance(row, dict):
                raise CacheError(f"{path} line {number} is not a JSON object; delete it (preprocess writes it anew).")
            counts[str(row.get("reason", "unknown"))] += 1
    return counts


def write_contact_sheet(folder: Path | str | Store, manifest: Manifest, path: Path, max_strips: int) -> int:
    """A PNG with one row per sample: its source and bucket, then its frame strip. Returns the rows."""
    from PIL import Image

    folder = open_store(folder)
    row_height = 64
    rows: list[tuple[str, list[Image.Image]]] = []
    for record in manifest.shards:
        if len(rows) >= max_strips:
            break  # enough rows: never read (and hash) the rest of a large cache
        for sample in read_shard(folder, record):
            if len(rows) >= max_strips:
                break
            data = sample.extras.get(STRIP_MEMBER)
            if data is None:
                continue
            strip = Image.open(io.BytesIO(data))
            if strip.width * strip.height > MAX_STRIP_PIXELS:  # checked before the pixels are decoded
                raise CacheError(
                    f"Sample {sample.key} in {folder.url(record.name)} has a {strip.width}x{strip.height} frame strip, "
                    f"more than {MAX_STRIP_PIXELS} pixels; cogvx writes 64 px high strips. The shard was changed."
                )
            strip = strip.convert("RGB")
            scale = row_height / strip.height
            strip = strip.resize((max(1, round(strip.width * scale)), row_height))
            label = f"{sample.meta.get('source', sample.key)}\n{sample.meta.get('bucket', '')}"
            window = sample.meta.get("window")
            if window:
                label += f" window {window}"
            rows.append((label, [strip]))
    if not rows:
        raise CacheError(
            f"No sample in {folder.location} has a frame strip (.{STRIP_MEMBER} member); caches written before strips "
            "were stored have none. Re-run `cogvx preprocess` into a new folder to get them."
        )
    write_png(path, contact_sheet(rows, pad=4, label_width=320, label_chars=48))
    return len(rows)


@dataclass
class VerifyReport:
    folder: Path | str
    shards: int
    samples: int
    problems: list[str]
    unlisted: list[str]  # shard files in the folder that the manifest does not list (never read)
    damaged: list[str] = field(default_factory=list)  # shards missing or changed since they were written
    unusable: list[str] = field(default_factory=list)  # intact shards holding samples training cannot use
    data: str | None = None  # the videos the cache was made from, when the manifest records them

    @property
    def ok(self) -> bool:
        return not self.problems

    def repair_command(self) -> str:
        data = shlex.quote(self.data) if self.data else "VIDEOS"
        return f"cogvx preprocess --data {data} --output {shlex.quote(str(self.folder))} --repair"

    def advice(self) -> str:
        """One line: how many problems, and exactly what to run."""
        said = f"{len(self.problems)} problem(s) in {self.folder}."
        command = f"`{self.repair_command()}`"
        unknown = "" if self.data else " (VIDEOS: the folder or metadata file the cache was made from)"
        if self.unusable:
            names = ", ".join(self.unusable[:3]) + (" ..." if len(self.unusable) > 3 else "")
            damaged = f" and the {len(self.damaged)} missing or changed one(s)" if self.damaged else ""
            return (
                f"{said} {len(self.unusable)} intact shard(s) hold what training cannot use ({names}): move them out "
                f"of the folder, then run {command}{unknown} to re-encode their samples{damaged}."
            )
        if self.damaged:
            names = ", ".join(self.damaged[:3]) + (" ..." if len(self.damaged) > 3 else "")
            return f"{said} Run {command}{unknown} to re-encode the samples of the missing or changed {names}."
        return f"{said} Fix or remove the files named above, then run `cogvx shards verify {self.folder}` again."


def verify_cache(cfg: VerifyConfig) -> VerifyReport:
    """Every shard and sample against the manifest (``check_shards``), and the side files it names."""
    store = open_store(cfg.folder)
    manifest = Manifest.load(store)
    found = check_shards(store, manifest.shards, deep=cfg.deep)
    problems = [problem.message for problem in found]
    for name, extra in sorted(manifest.extras.items()):
        if not isinstance(extra, dict) or "file" not in extra:
            continue
        path = store.url(extra["file"])  # a plain name: Manifest.load refuses any other
        if not extra.get("sha256"):
            continue
        try:
            with store.open(extra["file"]) as f:
                if sha256_of(f) != extra["sha256"]:
                    problems.append(f"{path} ({name}) does not match its sha256 in {paths.MANIFEST}")
        except FileNotFoundError:
            problems.append(f"{path} ({name}) is listed in {paths.MANIFEST} but missing")
        except CacheError as err:
            problems.append(str(err))
    listed = {record.name for record in manifest.shards}
    unlisted = [name for name in store.list() if name.endswith(".tar") and name not in listed]
    damaged = sorted({p.shard for p in found if p.damaged})
    unusable = sorted({p.shard for p in found if not p.damaged} - set(damaged))
    data = manifest.producer.get("data")
    return VerifyReport(
        store.folder if isinstance(store, LocalStore) else store.location,
        len(manifest.shards),
        manifest.sample_count,
        problems,
        unlisted,
        damaged,
        unusable,
        data if isinstance(data, str) and data else None,
    )


@dataclass
class RebuildResult:
    manifest: Manifest
    dropped_extras: list[str]  # side files named in the header that are gone or changed (not listed)


def rebuild_manifest(folder: Path | str) -> RebuildResult:
    """Re-create a lost ``manifest.json`` from the shard files in ``folder`` and save it.

    Every ``*.tar`` file is read completely and checked (as ``verify`` checks a listed shard); all must
    carry the same writer header (producer, params, schema). Shards are listed in the order their
    writers opened them, so, as when they were written, a later shard's samples replace earlier samples
    of the same source. Side files named in the header's ``extras`` are kept when they match their
    sha256. Refused when the folder has a manifest, and for a remote cache (URL).
    """
    if is_remote(folder):
        raise ConfigError(
            f"rebuild-manifest works on a local folder, not {display(folder)}: copy the cache's shards to a "
            f"folder (e.g. `aws s3 sync`), run it there, then upload the new {paths.MANIFEST} last."
        )
    folder = Path(folder)
    if paths.manifest(folder).exists() or paths.manifest(folder).is_symlink():
        raise CacheError(
            f"{paths.manifest(folder)} exists; rebuild-manifest never replaces one. Run `cogvx shards verify "
            f"{folder}` to check it, or move it away first if it is damaged."
        )
    names = sorted(p.name for p in folder.glob("*.tar") if is_plain_name(p.name)) if folder.is_dir() else []
    if not names:
        raise CacheError(f"No shard files (*.tar) in {folder}; nothing to rebuild a manifest from.")
    shards = []
    for name in names:
        try:
            shards.append(read_indexed_shard(folder, name))
        except CacheError as err:
            raise CacheError(f"Cannot rebuild the manifest of {folder}: {err}") from err
    first = shards[0]
    for shard in shards:
        if shard.header is None:
            raise CacheError(
                f"Shard {folder / shard.record.name} records no cogvx header (written before shards carried "
                "one, or not by cogvx), so the manifest cannot be rebuilt from it. Move it out of the folder, "
                "or re-run `cogvx preprocess` into a new folder."
            )
        if shard.header != first.header:
            raise CacheError(
                f"Shards {first.record.name} and {shard.record.name} in {folder} were written with different "
                "settings (their headers differ); one cache holds one set. Move the shards of one of them away."
            )
    header = first.header
    parts = {key: header.get(key) for key in ("producer", "params", "schema")}
    bad = [key for key, value in parts.items() if not isinstance(value, dict)]
    if bad:
        raise CacheError(f"The header of {folder / first.record.name} has no {bad[0]} object; it was not written by "
                         "cogvx preprocess.")  # fmt: skip
    manifest = Manifest(**parts)
    for shard in sorted(shards, key=lambda s: (s.opened, s.record.name)):
        manifest.add_shard(shard.record)
    dropped = []
    extras = header.get("extras")
    for label, extra in (extras if isinstance(extras, dict) else {}).items():
        if _side_file_matches(folder, extra):
            manifest.extras[label] = extra
        else:
            dropped.append(label)
    if paths.manifest(folder).exists():
        raise CacheError(f"{paths.manifest(folder)} appeared while rebuilding; left as it is.")
    manifest.save(folder)
    return RebuildResult(Manifest.load(folder), dropped)  # loaded: what readers will see, checked as they check it


def _side_file_matches(folder: Path, extra: object) -> bool:
    if not isinstance(extra, dict) or not is_plain_name(extra.get("file")):
        return False
    try:
        return file_sha256(folder / extra["file"]) == extra.get("sha256")
    except FileNotFoundError:
        return False


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


__all__ = [
    "CacheError",
    "RebuildResult",
    "rebuild_manifest",
    "CacheSummary",
    "InspectConfig",
    "VerifyConfig",
    "VerifyReport",
    "inspect",
    "verify_cache",
    "write_contact_sheet",
]
