"""What a run leaves for people: a loss-curve PNG and a model card README.md (names and metrics: cogvx.runs)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from cogvx import runs
from cogvx.media import ema, write_png
from cogvx.pipeline.models import NATIVE_FPS
from cogvx.train import evaluation


def draw_loss_curve(records: list[dict[str, Any]], path: Path, size: tuple[int, int] = (800, 450)) -> Path | None:
    """Loss per step (grey) and its moving average (blue) as a PNG, drawn with Pillow.

    A run with eval scores gets a second panel below: the held-out score per step (orange) and the base
    model's score (dashed), on the eval set of its last score (``evaluation.summary``).
    """
    from PIL import Image, ImageDraw

    points = [(r["step"], r["loss"]) for r in records if math.isfinite(r.get("loss", math.nan))]
    if not points:
        return None
    scores = evaluation.summary(records)
    width, height = size
    panel = height if scores is None else height * 2 - 40
    image = Image.new("RGB", (width, panel), "white")
    draw = ImageDraw.Draw(image)
    losses = [v for _, v in points]
    title = f"training loss ({len(points)} steps; blue: moving average)"
    frame = _Panel(draw, (0, 0, width, height), [s for s, _ in points], losses)
    frame.axes(title, step_label=scores is None)  # the panel below labels the shared step axis
    if len(points) > 1:
        frame.line(points, (170, 170, 170), 1)
        frame.line(list(zip([s for s, _ in points], ema(losses), strict=True)), (30, 90, 200), 2)
    else:
        frame.dot(points[0], (30, 90, 200))
    if scores is not None:
        name = evaluation.PREFIX + "loss"
        rows = [r for r in evaluation.eval_records(records, scores.eval_set) if math.isfinite(r[name])]
        evals = [(r["step"], r[name]) for r in rows]
        base = scores.base_loss
        values = [v for _, v in evals] + ([base] if base is not None and math.isfinite(base) else [])
        steps = [s for s, _ in points] + [s for s, _ in evals]
        below = _Panel(draw, (0, height - 40, width, panel), steps, values, margin=0.05)
        below.axes(
            f"eval loss on {scores.samples} held-out samples (orange)"
            + ("; dashed: the base model's" if base is not None else "")
        )
        if base is not None and math.isfinite(base):
            below.dashed(base, (90, 90, 90))
        if len(evals) > 1:
            below.line(evals, (220, 110, 20), 2)
        for point in evals:
            below.dot(point, (220, 110, 20))
    return write_png(path, image)


class _Panel:
    """One plot of a step axis and a value axis inside ``box`` (left, top, right, bottom) of the image."""

    def __init__(
        self, draw: Any, box: tuple[int, int, int, int], steps: list[float], values: list[float], margin: float = 0.0
    ):
        self.draw, self.box = draw, box
        self.x0, self.x1 = min(steps), max(max(steps), min(steps) + 1)
        self.y0, self.y1 = min(values), max(values)
        if self.y1 - self.y0 < 1e-12:
            self.y0, self.y1 = self.y0 - 0.5, self.y1 + 0.5
        pad = (self.y1 - self.y0) * margin  # keeps a line at the extremes (the base score) off the frame
        self.y0, self.y1 = self.y0 - pad, self.y1 + pad

    def xy(self, step: float, value: float) -> tuple[float, float]:
        left, top, right, bottom = self.box
        x = left + 70 + (step - self.x0) / (self.x1 - self.x0) * (right - left - 90)
        y = bottom - 50 - (value - self.y0) / (self.y1 - self.y0) * (bottom - top - 80)
        return x, y

    def axes(self, title: str, step_label: bool = True) -> None:
        left, top, right, bottom = self.box
        draw = self.draw
        draw.rectangle([left + 70, top + 30, right - 20, bottom - 50], outline="black")
        for i in range(5):
            value = self.y0 + (self.y1 - self.y0) * i / 4
            _, y = self.xy(self.x0, value)
            draw.line([left + 66, y, left + 70, y], fill="black")
            draw.text((left + 4, y - 6), f"{value:.4g}", fill="black")
            step = self.x0 + (self.x1 - self.x0) * i / 4
            x, _ = self.xy(step, self.y0)
            draw.line([x, bottom - 50, x, bottom - 46], fill="black")
            draw.text((x - 10, bottom - 42), f"{step:.0f}", fill="black")
        if step_label:
            draw.text(((left + right) // 2 - 15, bottom - 20), "step", fill="black")
        draw.text((left + 70, top + 8), title, fill="black")

    def line(self, points: list[tuple[float, float]], colour: tuple[int, int, int], width: int) -> None:
        self.draw.line([self.xy(s, v) for s, v in points], fill=colour, width=width)

    def dot(self, point: tuple[float, float], colour: tuple[int, int, int]) -> None:
        x, y = self.xy(*point)
        self.draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)

    def dashed(self, value: float, colour: tuple[int, int, int]) -> None:
        (start, y), (end, _) = self.xy(self.x0, value), self.xy(self.x1, value)
        x = start
        while x < end:
            self.draw.line([x, y, min(x + 8, end), y], fill=colour, width=1)
            x += 14


def model_card(
    *,
    model_name: str,
    model_source: str,
    config: dict[str, Any],
    steps: int,
    records: list[dict[str, Any]],
    manifest: Any,
    weights_name: str,
    world_size: int,
    image_to_video: bool = False,
    eval_summary: evaluation.Summary | None = None,
) -> str:
    """The run folder's README.md: what was trained on what, and how to load it in diffusers.

    Long because the card is one template read top to bottom, its values filled in where they appear.
    """
    final = runs.final_loss(records)
    mean_loss = f"{final[0]:.4f} ({final[1]})" if final else "n/a"
    buckets = ", ".join(f"{b} x{n}" for b, n in manifest.bucket_counts().items()) or "none"
    hub_like = "/" in model_name and not Path(model_name).exists()
    base = model_name if hub_like else model_source
    total_batch = config["batch_size"] * config["gradient_accumulation"] * world_size
    params = manifest.params
    # An image-to-video LoRA is used with the I2V pipeline, which starts every video from a given picture.
    pipeline = "CogVideoXImageToVideoPipeline" if image_to_video else "CogVideoXPipeline"
    image_import = ", load_image" if image_to_video else ""
    inputs = 'image=load_image("first_frame.png"), prompt="your prompt"' if image_to_video else '"your prompt"'
    lines = [
        "---",
        f"base_model: {model_name}" if hub_like else "base_model: null",
        "library_name: diffusers",
        f"tags: [cogvideox, {'image-to-video' if image_to_video else 'text-to-video'}, lora, cogvx]",
        "---",
        "",
        f"# LoRA for {model_name}",
        "",
        f"Trained with `cogvx train`. The resolved settings are in `{runs.CONFIG_TOML}` (reusable with "
        f"`cogvx train --config {runs.CONFIG_TOML}`), the per-step metrics in `{runs.METRICS}` and the loss "
        f"curve in `{runs.LOSS_CURVE}`.",
        "",
        "| | |",
        "|---|---|",
        f"| base model | `{model_name}` |",
        f"| LoRA rank / alpha | {config['rank']} / {config['alpha']:g} |",
        f"| target modules | {', '.join(config['targets'])} |",
        f"| LoRA dropout | {config['lora_dropout']:g} |",
        f"| steps | {steps} of {config['max_steps']} |",
        f"| batch | {config['batch_size']} per process x {config['gradient_accumulation']} accumulation x "
        f"{world_size} process(es) = {total_batch} |",
        f"| optimizer | {config['optimizer']}, LR {config['learning_rate']:g} ({config['lr_scheduler']}, "
        f"{config['lr_warmup_steps']} warm-up steps) |",
        f"| mixed precision | {config['mixed_precision']} |",
        f"| seed | {config['seed']} |",
        f"| final loss | {mean_loss} |",
        *_eval_rows(eval_summary),
        "",
        *_eval_note(eval_summary),
        "## Data",
        "",
        f"{manifest.sample_count} samples in {len(manifest.shards)} shard(s), encoded with "
        f"`{manifest.producer.get('model')}`; buckets (frames x height x width): {buckets}. "
        f"Frames sampled at {params.get('fps')} fps, resize `{params.get('resize')}`"
        + (f", id token `{params['id_token']}`" if params.get("id_token") else "")
        + ".",
        "",
        "## Use it with diffusers",
        "",
        "```python",
        "import torch",
        f"from diffusers import {pipeline}",
        f"from diffusers.utils import export_to_video{image_import}",
        "",
        f'pipe = {pipeline}.from_pretrained("{base}", torch_dtype=torch.bfloat16).to("cuda")',
        f'pipe.load_lora_weights("path/to/this/folder", weight_name="{weights_name}", adapter_name="cogvx")',
        f"video = pipe({inputs}, num_frames=49, guidance_scale=6.0, num_inference_steps=50).frames[0]",
        f'export_to_video(video, "output.mp4", fps={NATIVE_FPS})',
        "```",
        "",
        "The adapter's rank and alpha are stored in the weights' metadata, so diffusers applies the trained "
        "scale by itself: no `fuse_lora(lora_scale=...)` or `alpha / rank` correction is needed. "
        '`pipe.set_adapters(["cogvx"], [0.8])` weakens it.',
        "",
    ]
    return "\n".join(lines)


def _eval_rows(scores: evaluation.Summary | None) -> list[str]:
    if scores is None:
        return []
    base = f"{scores.base_loss:.4f}" if scores.base_loss is not None else "n/a"
    return [
        f"| eval loss (held out) | {scores.loss:.4f} at step {scores.step} |",
        f"| best eval loss | {scores.best_loss:.4f} at step {scores.best_step} |",
        f"| base model's eval loss | {base} |",
    ]


def _eval_note(scores: evaluation.Summary | None) -> list[str]:
    if scores is None:
        return []
    return [
        f"The eval loss is the training loss on {scores.samples} held-out samples the LoRA never trained on, at "
        f"{evaluation.EVAL_TIMESTEPS} fixed timesteps each with fixed noise: runs scored on the same held-out set "
        f"(`{runs.EVAL_SET}` in `{runs.CONFIG_JSON}`) compare with `cogvx compare`, and below the base model's it "
        "says the LoRA learned something that carries over to unseen clips. It is a learning signal, not a "
        "measure of visual quality: watch the validation videos for that.",
        "",
    ]
