"""What the HTML pages of ``cogvx report`` and ``cogvx compare`` share: SVG line charts, value text, the page script."""

from __future__ import annotations

import html
import json
import math
from typing import Any


def _nice_ticks(low: float, high: float, count: int = 5, integer: bool = False) -> list[float]:
    if not (math.isfinite(low) and math.isfinite(high)):
        return []
    if high <= low:
        pad = abs(low) * 0.1 or 1.0
        low, high = low - pad, high + pad
    raw = (high - low) / max(count - 1, 1)
    magnitude = 10 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 2.5, 5, 10) if m * magnitude >= raw)
    if integer:  # optimizer steps: no tick at step 1.5
        step = max(1, math.ceil(step))
    first = math.floor(low / step) * step
    ticks, value = [], first
    while value <= high + step * 1e-9:
        ticks.append(round(value, 12))
        value += step
    if ticks[-1] < high:
        ticks.append(ticks[-1] + step)
    return ticks


def fmt(value: float) -> str:
    """A number in at most four significant digits (scientific for very large or small ones)."""
    if value == 0:
        return "0"
    if abs(value) >= 1e4 or abs(value) < 1e-3:
        return f"{value:.1e}"
    return f"{value:.4g}"


def _finite_pairs(xs: list[float], ys: list[float]) -> list[tuple[float, float]]:
    return [(x, y) for x, y in zip(xs, ys, strict=True) if math.isfinite(x) and math.isfinite(y)]


def line_chart(title: str, xs: list[float], series: list[tuple[str, list[float], str]], width: int = 520) -> str:
    """An inline SVG line chart; ``series`` are (label, values, css class). Non-finite values are left out."""
    height, left, right, top, bottom = 240, 64, 12, 28, 36
    points = [pair for _, ys, _ in series for pair in _finite_pairs(xs, ys)]
    head = f'<svg class="chart" role="img" viewBox="0 0 {width} {height}" width="{width}" height="{height}">'
    head += f"<title>{html.escape(title)}</title>"
    head += f'<text class="chart-title" x="{left}" y="18">{html.escape(title)}</text>'
    if not points:
        return head + f'<text x="{left}" y="{height // 2}">no finite values</text></svg>'
    x_ticks = _nice_ticks(min(p[0] for p in points), max(p[0] for p in points), integer=True)
    y_ticks = _nice_ticks(min(p[1] for p in points), max(p[1] for p in points))
    x0, x1, y0, y1 = x_ticks[0], x_ticks[-1], y_ticks[0], y_ticks[-1]
    plot_w, plot_h = width - left - right, height - top - bottom

    def sx(x: float) -> float:
        return left + (x - x0) / ((x1 - x0) or 1) * plot_w

    def sy(y: float) -> float:
        return top + plot_h - (y - y0) / ((y1 - y0) or 1) * plot_h

    parts = [head]
    for y in y_ticks:
        parts.append(f'<line class="grid" x1="{left}" x2="{left + plot_w}" y1="{sy(y):.1f}" y2="{sy(y):.1f}"/>')
        parts.append(f'<text class="tick" x="{left - 6}" y="{sy(y) + 4:.1f}" text-anchor="end">{fmt(y)}</text>')
    for x in x_ticks:
        parts.append(f'<line class="grid" x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{top}" y2="{top + plot_h}"/>')
        label = fmt(x)
        parts.append(f'<text class="tick" x="{sx(x):.1f}" y="{top + plot_h + 16}" text-anchor="middle">{label}</text>')
    parts.append(f'<text class="tick" x="{left + plot_w}" y="{height - 4}" text-anchor="end">step</text>')
    for label, ys, css in series:
        coords = [f"{sx(x):.1f},{sy(y):.1f}" for x, y in _finite_pairs(xs, ys)]
        if len(coords) == 1:
            cx, cy = coords[0].split(",")
            name = html.escape(label)
            parts.append(f'<circle class="{css}" cx="{cx}" cy="{cy}" r="3"><title>{name}</title></circle>')
        elif coords:
            parts.append(
                f'<polyline class="{css}" fill="none" points="{" ".join(coords)}"><title>{html.escape(label)}</title>'
                "</polyline>"
            )
    legend_x = left + plot_w
    for i, (label, _, css) in enumerate(reversed(series)):
        parts.append(
            f'<text class="legend {css}" x="{legend_x}" y="{18}" dx="{-i * 110}" text-anchor="end">'
            f"{html.escape(label)}</text>"
        )
    parts.append("</svg>")
    return "".join(parts)


def plain(value: Any) -> str:
    """A config value as one line of text: lists comma-separated, objects as sorted JSON."""
    if isinstance(value, (list, tuple)):
        return ", ".join(str(v) for v in value)
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


# The only script on the page: it records load errors (a missing video, a broken image, a script
# error) and marks the page ready once every video has its metadata or failed, so a headless
# browser test can read both from the DOM. "Play all" restarts every video together.
SCRIPT = """
(function () {
  var errors = [];
  window.addEventListener("error", function (e) {
    var t = e.target;
    errors.push(e.message ? String(e.message) : "failed to load " + (t && (t.currentSrc || t.src) || "?"));
  }, true);
  function finish() {
    var videos = document.querySelectorAll("video");
    for (var i = 0; i < videos.length; i++) {
      videos[i].setAttribute("data-size", videos[i].videoWidth + "x" + videos[i].videoHeight);
    }
    document.body.setAttribute("data-errors", JSON.stringify(errors));
    document.body.setAttribute("data-ready", "1");
  }
  window.addEventListener("load", function () {
    var started = Date.now();
    (function poll() {
      var videos = document.querySelectorAll("video"), settled = 0;
      for (var i = 0; i < videos.length; i++) {
        if (videos[i].readyState >= 1 || videos[i].error) settled++;
      }
      if (settled === videos.length || Date.now() - started > 10000) finish(); else setTimeout(poll, 50);
    })();
    var button = document.getElementById("play-all");
    if (button) button.addEventListener("click", function () {
      var videos = document.querySelectorAll("video");
      for (var i = 0; i < videos.length; i++) { videos[i].currentTime = 0; videos[i].play(); }
    });
  });
})();
"""
