"""``cogvx compare RUN RUN ...``: runs of one cache side by side on one self-contained HTML page.

The page shows the settings that differ between the runs (one column per run), their held-out
scores on one plot with each run's base-model score as a dashed line, the best step of each, their
smoothed training losses, and their validation videos side by side for each prompt and step.

Runs are compared only when they trained on one cache. Where two runs both record the cache's
identity (``cache_id`` in config.json: the sha256 of its manifest) it decides, so a copy of a cache
read from another place is the same cache; otherwise the cache location each run recorded
(``shards``) does. Runs of different caches are refused in one line naming them.

Held-out scores (the ``eval_loss`` rows of metrics.jsonl, each naming its held-out set in
``eval_set``) are only comparable on one held-out set. Runs scored on different sets are not refused
(their training curves and videos still compare), but each set gets a plot of its own and the page
says, above the plots and in the runs table, that scores of different sets are not comparable.

A run folder is a local (or shared-filesystem) folder or any URL fsspec reads (``s3://bucket/run``).
A local run's videos are referenced by relative path, as ``cogvx report`` does; a remote run's videos
are embedded in the page, since a browser cannot read ``s3://``.
"""

from __future__ import annotations

import html
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cogvx import files, runs
from cogvx.compare_runs import HeldOut, Run, check_one_cache, finite_number, read_run
from cogvx.errors import ConfigError
from cogvx.media import EMA_WEIGHT, ema
from cogvx.pages import SCRIPT, fmt, line_chart, plain
from cogvx.stage_configs import LABELS, CompareConfig  # noqa: F401 (re-exported)

COLOURS = ("#c33", "#26a", "#385", "#a6c", "#d80", "#0aa", "#555", "#a52")
# Not compared: the output differs between any two runs by construction, and the plan is a prediction from settings
OWN_SETTINGS = ("output", runs.CHECKPOINTING_PLAN)
EVAL_PARTS = ("eval_high", "eval_mid", "eval_low")  # the held-out loss over high, mid and low noise levels


@dataclass
class CompareResult:
    path: Path
    runs: list[str]  # the runs' locations, in page order (labels A, B, ...)
    differing: list[str]  # the settings that differ between them
    eval_sets: list[str]  # the held-out sets scored, in page order
    best: dict[str, tuple[int, float]]  # label -> best step and its held-out loss (on the run's first set)
    videos: int  # video cells on the page (rendered or not)
    notes: list[str] = field(default_factory=list)  # what the page says is missing or not comparable


# --------------------------------------------------------------------------- page parts


def _settings(compared: list[Run]) -> tuple[str, list[str]]:
    """The settings that differ (one column per run), and the shared ones folded away."""
    keys = sorted({k for run in compared for k in run.config} - set(OWN_SETTINGS))
    missing = object()

    def value(run: Run, key: str) -> Any:
        return run.config.get(key, missing)

    def same(key: str) -> bool:
        values = [value(run, key) for run in compared]
        return all(v is not missing for v in values) and len({json.dumps(v, sort_keys=True) for v in values}) == 1

    differing = [k for k in keys if not same(k)]
    shared = [k for k in keys if same(k)]
    head = "".join(f'<th class="r{i}">{html.escape(run.title)}</th>' for i, run in enumerate(compared))

    def cell(run: Run, key: str) -> str:
        found = value(run, key)
        return '<td class="unset">(not set)</td>' if found is missing else f"<td>{html.escape(plain(found))}</td>"

    rows = "".join(
        f'<tr data-setting="{html.escape(k)}"><th>{html.escape(k)}</th>{"".join(cell(r, k) for r in compared)}</tr>'
        for k in differing
    )
    if differing:
        table = f'<table id="settings" class="diff"><thead><tr><th>setting</th>{head}</tr></thead>'
        table += f"<tbody>{rows}</tbody></table>"
    else:
        table = '<p id="settings" class="note">Every setting is the same in these runs.</p>'
    if shared:
        body = "".join(
            f"<tr><th>{html.escape(k)}</th><td>{html.escape(plain(compared[0].config[k]))}</td></tr>" for k in shared
        )
        table += f'<details><summary>{len(shared)} settings the runs share</summary><table class="kv">{body}</table>'
        table += "</details>"
    return table, differing


def _chart(title: str, xs: list[float], series: list[tuple[str, list[float], str]]) -> str:
    # line_chart lays its legend out right to left, 110 px an entry: room for every entry beside the title
    width = max(560, 64 + 8 * len(title) + 110 * len(series) + 24)
    return f'<div class="scroll">{line_chart(title, xs, series, width=width)}</div>'


def _eval_section(compared: list[Run], notes: list[str]) -> tuple[str, list[str]]:
    """One plot per held-out set (one set: one plot), each run's base score dashed."""
    sets: dict[str, list[tuple[int, HeldOut]]] = {}
    for i, run in enumerate(compared):
        for scores in run.held_out():
            sets.setdefault(scores.eval_set, []).append((i, scores))
    if not sets:
        notes.append("no run has held-out scores")
        return (
            f'<p class="note" id="no-eval">No run has held-out scores (eval_loss rows in {runs.METRICS}).</p>',
            [],
        )
    parts = []
    if len(sets) > 1:
        named = "; ".join(
            f"{_short(name)}: {', '.join(compared[i].label for i, _ in who)}" for name, who in sets.items()
        )
        notes.append(f"the runs were scored on {len(sets)} different held-out sets; their scores are not comparable")
        parts.append(
            f'<p class="warning" id="eval-sets-differ">Not comparable: these runs were scored on {len(sets)} '
            f"different held-out sets ({html.escape(named)}). Each set has its own plot; compare scores only "
            "within one.</p>"
        )
    for name, members in sets.items():
        xs = sorted({step for _, scores in members for step in scores.rows})
        series = []
        for i, scores in members:
            values = [float(scores.rows[x]["eval_loss"]) if x in scores.rows else math.nan for x in xs]
            series.append((compared[i].title, values, f"r{i}"))
        bases = {scores.base for _, scores in members if scores.base is not None}
        if len(bases) == 1:  # the same base model on the same set: one line for all
            series.append(("base (LoRA off)", [bases.pop()] * len(xs), "base"))
        else:
            for i, scores in members:
                if scores.base is not None:
                    series.append((f"{compared[i].label} base", [scores.base] * len(xs), f"base r{i}"))
        title = "held-out loss" if len(sets) == 1 else f"held-out loss, set {_short(name)}"
        parts.append(
            f'<div class="eval-set" data-eval-set="{html.escape(name)}">{_chart(title, [float(x) for x in xs], series)}'
            "</div>"
        )
    return "".join(parts), list(sets)


def _short(eval_set: str) -> str:
    return eval_set[:12]


def _runs_table(compared: list[Run], eval_sets: list[str]) -> tuple[str, dict[str, tuple[int, float]]]:
    """One row per run and held-out set: where the run is, how far it trained, its best step against the base."""
    several = len(eval_sets) > 1
    head = (
        "<th>run</th><th>location</th><th>model</th><th>steps</th>"
        f"<th>final train loss (EMA {EMA_WEIGHT:g})</th><th>held-out set</th><th>samples</th><th>base loss</th>"
        f"<th>best step</th><th>best loss</th><th>vs base</th><th>{' / '.join(EVAL_PARTS)}</th>"
    )
    rows, best = [], {}
    for i, run in enumerate(compared):
        steps = max((int(r["step"]) for r in run.metrics if finite_number(r.get("loss"))), default=0)
        final = runs.final_loss(run.metrics)
        lead = (
            f'<th class="r{i}">{html.escape(run.label)}</th><td>{html.escape(run.location)}</td>'
            f"<td>{html.escape(str(run.config.get('model', '?')))}</td>"
            f"<td>{steps} of {html.escape(str(run.config.get('max_steps', '?')))}</td>"
            f"<td>{fmt(final[0]) if final else '-'}</td>"
        )
        scored = run.held_out()
        if not scored:
            rows.append(f'<tr data-run="{run.label}">{lead}<td colspan="7" class="note">no held-out scores</td></tr>')
        for scores in scored:
            marked = ' class="not-comparable" title="not comparable with the other sets"' if several else ""
            cells = [f"<td{marked}>{html.escape(_short(scores.eval_set))}</td>"]
            base = fmt(scores.base) if scores.base is not None else "-"
            if scores.rows:
                step, row = scores.best()
                loss = float(row["eval_loss"])
                best.setdefault(run.label, (step, loss))
                change = f"{(loss - scores.base) / scores.base:+.1%}" if scores.base else "-"
                parts = " / ".join(fmt(float(row[k])) if finite_number(row.get(k)) else "-" for k in EVAL_PARTS)
                samples = html.escape(str(row.get("eval_samples", "?")))
                cells += [f"<td>{samples}</td><td>{base}</td>", f'<td class="best-step">{step}</td>']
                cells += [f'<td class="best-loss">{fmt(loss)}</td><td>{change}</td><td>{parts}</td>']
            else:
                cells += [f"<td>-</td><td>{base}</td>", '<td colspan="4" class="note">base score only</td>']
            key = f'data-run="{run.label}" data-eval-set="{html.escape(scores.eval_set)}"'
            rows.append(f"<tr {key}>{lead}{''.join(cells)}</tr>")
    table = f'<table id="runs" class="grid"><thead><tr>{head}</tr></thead><tbody>{"".join(rows)}</tbody></table>'
    return f'<div class="scroll">{table}</div>', best


def _loss_chart(compared: list[Run]) -> str:
    losses = [run.losses() for run in compared]
    xs = sorted({step for per_run in losses for step in per_run})
    if not xs:
        return f'<p class="note">No training losses in {runs.METRICS} yet.</p>'
    series = []
    for i, (run, per_run) in enumerate(zip(compared, losses, strict=True)):
        steps = sorted(per_run)
        smoothed = dict(zip(steps, ema([per_run[s] for s in steps]), strict=True))
        series.append((run.title, [smoothed.get(x, math.nan) for x in xs], f"r{i}"))
    return _chart(f"training loss (EMA {EMA_WEIGHT:g})", [float(x) for x in xs], series)


def _videos_section(compared: list[Run], notes: list[str]) -> tuple[str, int]:
    """Per prompt, a table of steps (rows) x runs (columns); a prompt is matched across runs by its text."""
    prompts: list[str] = []
    for run in compared:
        for video in sorted(run.videos, key=lambda v: v.index):
            if video.prompt not in prompts:
                prompts.append(video.prompt)
    if not prompts:
        notes.append("no validation samples")
        return f'<p class="note" id="no-validation">No run has validation samples ({runs.VALIDATION_LAYOUT}).</p>', 0
    for run in compared:
        latent_only = sum(v.src is None for v in run.videos)
        if latent_only:
            notes.append(f"{run.label}: {latent_only} sample(s) without a video: run `cogvx render {run.location}`")
    head = "".join(f'<th class="r{i}">{html.escape(run.title)}</th>' for i, run in enumerate(compared))
    tables, cells = [], 0
    for prompt in prompts:
        found = {
            (run.label, v.step): v for run in compared for v in reversed(run.videos) if v.prompt == prompt
        }  # reversed: the lowest sample index wins where a run repeats a prompt
        rows = []
        for step in sorted({step for _, step in found}):
            tds = []
            for run in compared:
                video = found.get((run.label, step))
                where = f'data-run="{run.label}" data-step="{step}"'
                if video is None:
                    tds.append(f'<td class="empty" {where}>no sample</td>')
                    continue
                cells += 1
                where += f' data-sample="{video.index}"'
                if video.src is None:
                    hint = html.escape(f"not rendered: run cogvx render {run.location}")
                    tds.append(f'<td class="cell missing" {where}>{hint}</td>')
                else:
                    label = html.escape(f"{run.title}, step {step}: {prompt}")
                    tds.append(
                        f'<td class="cell" {where}><video src="{html.escape(video.src)}" title="{label}" '
                        'controls loop muted playsinline preload="auto"></video></td>'
                    )
            rows.append(f'<tr><th class="step">step {step}</th>{"".join(tds)}</tr>')
        tables.append(
            f'<h3 class="prompt">{html.escape(prompt)}</h3><div class="scroll"><table class="grid videos">'
            f"<thead><tr><th>step \\ run</th>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table></div>"
        )
    button = '<p><button id="play-all" type="button">play all from the start</button></p>'
    return button + "".join(tables), cells


_STYLE = """
body { font: 14px/1.4 system-ui, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; border-bottom: 1px solid #ddd; }
h3.prompt { font-size: 14px; font-weight: normal; font-style: italic; }
table.kv th { text-align: left; padding: 2px 12px 2px 0; font-weight: 600; vertical-align: top; }
table.kv td, table.diff td { font-family: ui-monospace, monospace; word-break: break-all; }
table.diff, table.grid { border-collapse: collapse; }
table.diff th, table.diff td, table.grid th, table.grid td { border: 1px solid #ddd; padding: 4px; }
table.diff th, table.diff td { vertical-align: top; }
table.diff th { text-align: left; } td.unset { color: #999; }
svg.chart { border: 1px solid #eee; background: #fff; }
svg .grid { stroke: #eee; } svg .tick { font-size: 10px; fill: #666; }
svg .chart-title { font-size: 12px; font-weight: 600; } svg .legend { font-size: 11px; stroke: none; }
svg polyline { stroke-width: 2; } svg .base { stroke-dasharray: 6 4; stroke: #888; stroke-width: 1.5; }
svg text.base { fill: #888; stroke: none; }
.scroll { overflow-x: auto; }
table.grid video { display: block; width: 192px; background: #000; }
td.missing, td.empty, .note { color: #a60; font-size: 12px; }
.warning { color: #fff; background: #b22; padding: 6px 10px; font-weight: 600; }
td.not-comparable { background: #fdd; font-weight: 600; }
"""


def _colours() -> str:
    return "".join(
        f"svg polyline.r{i} {{ stroke: {c}; }} svg text.r{i} {{ fill: {c}; }} svg circle.r{i} {{ fill: {c}; }} "
        f"th.r{i} {{ color: {c}; }}\n"
        for i, c in enumerate(COLOURS)
    )


def run(cfg: CompareConfig) -> CompareResult:
    """Write the comparison page; refuse an existing output file unless ``overwrite``."""
    if cfg.output.exists() and not cfg.overwrite:
        raise ConfigError(f"{cfg.output} already exists; pass --overwrite to replace it, or choose another --output.")
    page_dir = cfg.output.resolve().parent
    compared = [read_run(location, label, page_dir) for location, label in zip(cfg.runs, LABELS, strict=False)]
    check_one_cache(compared)

    notes: list[str] = []
    for run_ in compared:
        if run_.bad_lines:
            notes.append(f"{run_.label}: {run_.bad_lines} unreadable line(s) in {runs.METRICS} left out")
    settings, differing = _settings(compared)
    evals, eval_sets = _eval_section(compared, notes)
    table, best = _runs_table(compared, eval_sets)
    videos, cells = _videos_section(compared, notes)
    note_list = "".join(f"<li>{html.escape(n)}</li>" for n in notes)
    title = "cogvx compare: " + ", ".join(run_.title for run_ in compared)
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{html.escape(title)}</title>
<style>{_STYLE}{_colours()}</style>
<script>{SCRIPT}</script>
</head><body>
<h1>{html.escape(title)}</h1>
<p>Written {time.strftime("%Y-%m-%d %H:%M:%S")}.</p>
{f'<ul class="note" id="notes">{note_list}</ul>' if notes else ""}
<h2>Runs and their best held-out step</h2>
{table}
<h2>Settings that differ</h2>
{settings}
<h2>Held-out loss (lower is better; dashed: the base model, LoRA off)</h2>
{evals}
<h2>Training loss</h2>
{_loss_chart(compared)}
<h2>Validation videos (per prompt: steps x runs)</h2>
{videos}
</body></html>
"""
    cfg.output.parent.mkdir(parents=True, exist_ok=True)
    files.write_bytes_atomic(cfg.output, page.encode("utf-8"))
    return CompareResult(cfg.output, [r.location for r in compared], differing, eval_sets, best, cells, notes)
