"""One "final loss": the end of `cogvx train`, the model card and the report say the same number, and
the run's end says where everything is and how to use it."""

from __future__ import annotations

import re

from typer.testing import CliRunner

from cogvx import media, runs
from cogvx.cli import app


def test_train_ends_by_saying_where_the_run_is_with_the_one_final_loss(tiny_cache, tmp_path):
    run = tmp_path / "run"
    argv = ["train", "--shards", str(tiny_cache), "--output", str(run), "--max-steps", "4", "--rank", "4"]
    result = CliRunner().invoke(app, [*argv, "--workers", "0", "--checkpoint-every", "0"])
    assert result.exit_code == 0, result.output
    said = " ".join(result.output.split())

    losses = [r["loss"] for r in runs.read_metrics(run)]
    final = f"{media.ema(losses)[-1]:.4f}"
    assert f"trained 4 steps, final loss {final} (EMA 0.9 of 4 step losses)" in said
    for path in (runs.lora_weights(run), runs.model_card(run), runs.loss_curve(run)):
        assert str(path) in said
    assert f"cogvx report {run}" in said and f"cogvx sample --lora {run}" in said

    assert f"| final loss | {final} (EMA 0.9 of 4 step losses) |" in runs.model_card(run).read_text()
    report = CliRunner().invoke(app, ["report", str(run), "--no-render"])
    assert report.exit_code == 0, report.output
    page = runs.report(run).read_text()
    row = re.search(r"final loss \(EMA 0\.9 of 4 step losses\)</t[hd]>\s*<td>([^<]+)</td>", page)
    assert row and float(row.group(1)) == float(final)
