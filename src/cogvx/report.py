"""``cogvx report``: one self-contained HTML page per run (no network, no CDN, no JS library).

It shows the resolved config, a summary of the cache the run trained on, loss / learning-rate /
gradient-norm curves drawn as inline SVG, and the validation videos as a grid of prompts x steps.
Videos are referenced by relative path (they sit in the run folder), so the page and the run folder
travel together.
"""

from __future__ import annotations

import html
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cogvx import files, render, runs
from cogvx.errors import RunError
from cogvx.media import ema
from cogvx.pages import SCRIPT, fmt, line_chart, plain
from cogvx.shards import paths
from cogvx.shards.store import is_remote
from cogvx.stage_configs import ReportConfig  # noqa: F401 (re-exported)


@dataclass
class ReportResult:
    path: Path
    metrics: int  # optimizer steps with a metrics line
    validation_steps: list[int]
    prompts: list[str]
    cells: int  # video cells in the grid (prompts x steps)
    rendered: list[int] = field(default_factory=list)  # steps decoded by this call
    notes: list[str] = field(default_factory=list)  # what the page says is missing


def find_cache(run: Path, shards: str | None) -> Path | str | None:
    """The cache a run trained on: its recorded path, as given or relative to the run's folders (a URL as it is)."""
    if not shards:
        return None
    if is_remote(shards):
        return shards  # read where it is: Manifest.load says what is wrong with it
    given = Path(shards)
    candidates = [given] if given.is_absolute() else [given, run / given, run.parent / given, run.parent.parent / given]
    return next((c for c in candidates if paths.manifest(c).is_file()), None)


# --------------------------------------------------------------------------- page parts


def _eval_chart(metrics: list[dict[str, Any]]) -> str | None:
    """The held-out score per step (``eval_loss``) on the eval set of its last row, the base model's dashed."""
    rows = [m for m in metrics if isinstance(m.get("eval_loss"), (int, float))]
    if not rows:
        return None
    scored_on = max(rows, key=lambda m: m["step"]).get("eval_set")
    rows = sorted((m for m in rows if m.get("eval_set") == scored_on), key=lambda m: m["step"])
    xs = [float(m["step"]) for m in rows]
    series = [("eval loss", [float(m["eval_loss"]) for m in rows], "eval")]
    base = [m["eval_base_loss"] for m in metrics if m.get("eval_set") == scored_on and "eval_base_loss" in m]
    if base and isinstance(base[-1], (int, float)):
        xs = [0.0, *xs]
        series = [("eval loss", [math.nan, *series[0][1]], "eval"), ("base model", [float(base[-1])] * len(xs), "base")]
    return line_chart(f"held-out eval loss ({rows[-1].get('eval_samples', '?')} samples)", xs, series)


def _table(rows: list[tuple[str, Any]], css: str = "kv") -> str:
    body = "".join(f"<tr><th>{html.escape(str(k))}</th><td>{html.escape(plain(v))}</td></tr>" for k, v in rows)
    return f'<table class="{css}">{body}</table>'


def _data_section(run: Path, config: dict[str, Any], notes: list[str]) -> str:
    from cogvx.shards import CacheError, Manifest

    shards = config.get("shards")
    if shards is not None and not isinstance(shards, str):
        raise RunError(
            f'{runs.config_json(run)} gives "shards" as {shards!r}, not the path of a cache: write there the path '
            "of the cache the run trained on, or remove the line."
        )
    cache = find_cache(run, shards)
    if cache is None:
        where = config.get("shards", f"({runs.CONFIG_JSON} names none)")
        notes.append(f"cache not found at {where}")
        return f'<p class="note">The cache this run trained on was not found ({html.escape(str(where))}).</p>'
    try:
        manifest = Manifest.load(cache)
    except CacheError as err:
        notes.append(str(err))
        return f'<p class="note">{html.escape(str(err))}</p>'
    rows: list[tuple[str, Any]] = [
        ("cache", cache if isinstance(cache, str) else cache.resolve()),
        ("encoded with", manifest.producer.get("model")),
        ("samples", manifest.sample_count),
        ("shards", len(manifest.shards)),
        ("size on disk", f"{manifest.total_bytes / 2**20:.1f} MiB"),
    ]
    buckets = manifest.bucket_counts()
    rows.append(("buckets (frames x h x w)", ", ".join(f"{bucket}: {count}" for bucket, count in buckets.items())))
    rows += list(manifest.params.items())
    validation = manifest.extras.get(paths.VALIDATION_ENTRY, {})
    if validation.get("prompts"):
        rows.append(("validation prompts", " | ".join(validation["prompts"])))
    sources = [s.source for shard in manifest.shards for s in shard.samples]
    shown = ", ".join(sources[:12]) + (f", ... ({len(sources) - 12} more)" if len(sources) > 12 else "")
    rows.append(("sources", shown))
    return _table(rows)


def _video_grid(page_dir: Path, steps: list[render.ValidationStep]) -> tuple[str, list[str], int]:
    """Table of prompts (rows, by sample index) x steps (columns); returns (html, prompts, cells)."""
    prompts: dict[int, str] = {}
    images: dict[int, str] = {}  # image-to-video runs: the first frame each prompt's videos start from
    for step in steps:
        for sample in step.samples:
            index = runs.sample_index(sample)
            if index not in prompts:
                prompts[index] = runs.read_validation_sample(sample)[1].get("prompt", sample.stem)
                image = _conditioning_image(sample)
                if image is not None:
                    images[index] = image
    head = "".join(f'<th class="step">step {s.step}</th>' for s in steps)
    rows, cells = [], 0
    for index in sorted(prompts):
        tds = []
        for step in steps:
            sample = next((p for p in step.samples if runs.sample_index(p) == index), None)
            video = step.video(sample) if sample is not None else None
            if video is not None and video.is_file():
                src = html.escape(Path(os.path.relpath(video, page_dir)).as_posix())
                label = html.escape(f"step {step.step}: {prompts[index]}")
                tds.append(
                    f'<td class="cell" data-step="{step.step}" data-sample="{index}"><video src="{src}" '
                    f'title="{label}" controls loop muted playsinline preload="auto"></video></td>'
                )
                cells += 1
            elif sample is not None:
                tds.append(f'<td class="cell missing" data-step="{step.step}">not rendered: run cogvx render</td>')
                cells += 1
            else:
                tds.append('<td class="empty"></td>')
        image = ""
        if index in images:
            image = (
                f'<img class="conditioning" data-sample="{index}" alt="first frame" title="the first frame the videos '
                f'start from" src="{images[index]}">'
            )
        rows.append(f'<tr><th class="prompt">{html.escape(prompts[index])}{image}</th>{"".join(tds)}</tr>')
    table = (
        f'<table id="grid" class="grid"><thead><tr><th>prompt \\ step</th>{head}</tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )
    return table, [prompts[i] for i in sorted(prompts)], cells


def _conditioning_image(sample: Path) -> str | None:
    """An image-to-video validation sample's first frame (its tensor ``image``) as a PNG data URI, else None."""
    import base64
    import io

    from PIL import Image
    from safetensors import safe_open

    with safe_open(str(sample), framework="pt") as f:
        if "image" not in f.keys():  # noqa: SIM118
            return None
        pixels = f.get_tensor("image").numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table.kv th { text-align: left; padding: 2px 12px 2px 0; font-weight: 600; vertical-align: top; }
table.kv td { font-family: ui-monospace, monospace; word-break: break-all; }
.charts { display: flex; flex-wrap: wrap; gap: 12px; }
svg.chart { border: 1px solid #eee; background: #fff; }
svg .grid { stroke: #eee; } svg .tick { font-size: 10px; fill: #666; }
svg .chart-title { font-size: 12px; font-weight: 600; } svg .legend { font-size: 11px; }
svg .raw { stroke: #9ab; stroke-width: 1; } svg .smooth { stroke: #c33; stroke-width: 2; }
svg .lr { stroke: #26a; stroke-width: 2; } svg .gn { stroke: #385; stroke-width: 1.5; }
svg text.raw, svg text.smooth, svg text.lr, svg text.gn { stroke: none; }
svg text.raw { fill: #9ab; } svg text.smooth { fill: #c33; } svg text.lr { fill: #26a; } svg text.gn { fill: #385; }
svg circle { fill: currentColor; }
svg .eval { stroke: #d80; stroke-width: 2; } svg .base { stroke: #555; stroke-width: 1; stroke-dasharray: 6 4; }
svg text.eval { fill: #d80; stroke: none; } svg text.base { fill: #555; stroke: none; }
.scroll { overflow-x: auto; }
table.grid { border-collapse: collapse; }
table.grid th, table.grid td { border: 1px solid #ddd; padding: 4px; vertical-align: top; }
table.grid th.prompt { max-width: 220px; text-align: left; font-weight: normal; }
table.grid video { display: block; width: 192px; background: #000; }
table.grid img.conditioning { display: block; width: 192px; margin-top: 4px; }
td.missing { color: #a60; font-size: 12px; }
.note { color: #a60; }
"""


def _summary(run: Path, config: dict[str, Any], metrics: list[dict[str, Any]]) -> list[tuple[str, Any]]:
    """The rows above the curves: the run, its base model, how far it trained, its loss and its LoRA."""
    summary: list[tuple[str, Any]] = [
        ("run", run.resolve()),
        ("base model", config.get("model", "?")),
        ("steps trained", f"{int(float(metrics[-1]['step'])) if metrics else 0} of {config.get('max_steps', '?')}"),
    ]
    if metrics:
        final = runs.final_loss(metrics)
        if final:
            summary.append((f"final loss ({final[1]})", fmt(final[0])))
        summary.append(("last step's loss", fmt(_column(metrics, "loss")[-1])))
        seconds = sorted(v for v in _column(metrics, runs.VALIDATION_SECONDS) if math.isfinite(v))
        if seconds:
            median = seconds[len(seconds) // 2]
            summary.append(("time per validation", f"{median:.1f} s (median of {len(seconds)})"))
    targets = plain(config.get("targets", "?"))
    return summary + [
        ("LoRA", f"rank {config.get('rank', '?')}, alpha {config.get('alpha', '?')}, on {targets}"),
        ("written", time.strftime("%Y-%m-%d %H:%M:%S")),
    ]


def _column(metrics: list[dict[str, Any]], key: str) -> list[float]:
    """One metric per metrics line, NaN where a line lacks it (so every curve shares the steps)."""
    return [float(m[key]) if isinstance(m.get(key), (int, float)) else math.nan for m in metrics]


def _curves(metrics: list[dict[str, Any]], notes: list[str]) -> str:
    """Loss (raw and smoothed), held-out loss, learning rate and gradient norm per step."""
    if not metrics:
        notes.append(f"no {runs.METRICS}")
        return f'<p class="note">No {runs.METRICS} in this run yet.</p>'
    xs = [float(m["step"]) for m in metrics]
    losses = _column(metrics, "loss")
    charts = [
        line_chart("loss", xs, [("loss", losses, "raw"), ("EMA 0.9", ema(losses), "smooth")]),
        line_chart("learning rate", xs, [("lr", _column(metrics, "lr"), "lr")]),
    ]
    held_out = _eval_chart(metrics)
    if held_out:
        charts.insert(1, held_out)
    grad_norm = _column(metrics, "grad_norm")
    if any(math.isfinite(v) for v in grad_norm):
        charts.append(line_chart("gradient norm (before clipping)", xs, [("grad norm", grad_norm, "gn")]))
    return f'<div class="charts">{"".join(charts)}</div>'


def _validation(page_dir: Path, steps: list[render.ValidationStep], notes: list[str]) -> tuple[str, list[str], int]:
    """The video grid with its play-all button, or a note on how to get videos; returns (html, prompts, cells)."""
    if not steps:
        notes.append("no validation latents")
        return (
            f'<p class="note" id="no-validation">This run has no validation samples ({runs.VALIDATION_LAYOUT}). '
            f"{html.escape(render.NO_VALIDATION_HINT)}</p>",
            [],
            0,
        )
    grid, prompts, cells = _video_grid(page_dir, steps)
    button = '<p><button id="play-all" type="button">play all from the start</button></p>'
    return f'{button}<div class="scroll">{grid}</div>', prompts, cells


def run(cfg: ReportConfig) -> ReportResult:
    """Write the report page; render validation videos first when some are missing (``render=True``)."""
    if not cfg.run.is_dir():
        raise RunError(f"Run folder {cfg.run} does not exist.")
    config = runs.read_config(cfg.run)
    metrics, bad_lines = runs.read_metrics_counted(cfg.run)
    if not config and not metrics:
        raise RunError(
            f"{cfg.run} holds neither {runs.CONFIG_JSON} nor {runs.METRICS}: it is not a `cogvx train` run folder."
        )
    notes: list[str] = []
    rendered: list[int] = []
    steps = render.find_validation(cfg.run)
    if steps and cfg.render and any(not s.rendered for s in steps):
        result = render.run_render(render.RenderConfig(cfg.run, model=cfg.model))
        rendered = [s.step for s in result.rendered]
    metrics_note = ""
    if bad_lines:
        notes.append(f"{bad_lines} unreadable line(s) in {runs.METRICS} left out")
        metrics_note = f'<p class="note">{html.escape(notes[-1])}</p>'
    curves = _curves(metrics, notes)
    validation, prompts, cells = _validation(cfg.output.resolve().parent, steps, notes)

    title = f"cogvx run {cfg.run.resolve().name}"
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{_STYLE}</style>
<script>{SCRIPT}</script>
</head><body>
<h1>{html.escape(title)}</h1>
{_table(_summary(cfg.run, config, metrics))}
{metrics_note}
<h2>Training curves</h2>
{curves}
<h2>Validation videos (prompts x steps)</h2>
{validation}
<h2>Data</h2>
{_data_section(cfg.run, config, notes)}
<h2>Config</h2>
{_table(sorted(config.items())) if config else f'<p class="note">No {runs.CONFIG_JSON} in this run.</p>'}
</body></html>
"""
    cfg.output.parent.mkdir(parents=True, exist_ok=True)
    files.write_bytes_atomic(cfg.output, page.encode("utf-8"))
    return ReportResult(cfg.output, len(metrics), [s.step for s in steps], prompts, cells, rendered, notes)
