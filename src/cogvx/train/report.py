"""What a run leaves for people: a loss-curve PNG and a model card README.md (names and metrics: cogvx.runs)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from cogvx import runs
from cogvx.media import ema, write_png
from cogvx.pipeline.models import NATIVE_FPS


def draw_loss_curve(records: list[dict[str, Any]], path: Path, size: tuple[int, int] = (800, 450)) -> Path | None:
    """Loss per step (grey) and its moving average (blue) as a PNG, drawn with Pillow."""
    from PIL import Image, ImageDraw

    points = [(r["step"], r["loss"]) for r in records if math.isfinite(r.get("loss", math.nan))]
    if not points:
        return None
    width, height = size
    left, right, top, bottom = 70, 20, 30, 50
    image = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(image)
    steps = [s for s, _ in points]
    losses = [v for _, v in points]
    smooth = ema(losses)
    x0, x1 = min(steps), max(max(steps), min(steps) + 1)
    y0, y1 = min(losses), max(losses)
    if y1 - y0 < 1e-12:
        y0, y1 = y0 - 0.5, y1 + 0.5

    def xy(step: float, loss: float) -> tuple[float, float]:
        x = left + (step - x0) / (x1 - x0) * (width - left - right)
        y = height - bottom - (loss - y0) / (y1 - y0) * (height - top - bottom)
        return x, y

    draw.rectangle([left, top, width - right, height - bottom], outline="black")
    for i in range(5):
        loss = y0 + (y1 - y0) * i / 4
        _, y = xy(x0, loss)
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((4, y - 6), f"{loss:.4g}", fill="black")
        step = x0 + (x1 - x0) * i / 4
        x, _ = xy(step, y0)
        draw.line([x, height - bottom, x, height - bottom + 4], fill="black")
        draw.text((x - 10, height - bottom + 8), f"{step:.0f}", fill="black")
    draw.text((width // 2 - 15, height - 20), "step", fill="black")
    draw.text((left, 8), f"training loss ({len(points)} steps; blue: moving average)", fill="black")
    if len(points) > 1:
        draw.line([xy(s, v) for s, v in points], fill=(170, 170, 170), width=1)
        draw.line([xy(s, v) for s, v in zip(steps, smooth, strict=True)], fill=(30, 90, 200), width=2)
    else:
        x, y = xy(*points[0])
        draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=(30, 90, 200))
    return write_png(path, image)


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
) -> str:
    """The run folder's README.md: what was trained on what, and how to load it in diffusers."""
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
        "",
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
