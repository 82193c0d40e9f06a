"""The Accelerator a run trains under: built once from the config, checked against what the launcher started.

Also the launch's timeline (how long the process took to reach each phase of its first step) and the
end-of-run check that every data-parallel process holds the same LoRA.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch

from cogvx import clock, runs
from cogvx.errors import ConfigError
from cogvx.train.config import TrainConfig

# accelerate's word for each of our precisions (models.DTYPES names); used only where the Accelerator is built.
ACCELERATE_PRECISION = {"bf16": "bf16", "fp16": "fp16", "fp32": "no"}


def make_accelerator(cfg: TrainConfig):
    """The run's Accelerator (trackers, precision, logging folder), refusing a launch that would train apart."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import ProjectConfiguration, is_tensorboard_available, is_wandb_available

    if cfg.report_to == "tensorboard" and not is_tensorboard_available():
        raise ConfigError("--report-to tensorboard needs tensorboard: pip install tensorboard")
    if cfg.report_to == "wandb" and not is_wandb_available():
        raise ConfigError("--report-to wandb needs wandb: pip install wandb, then `wandb login`")
    asked = _processes_asked_of_accelerate()
    if asked > 1:
        raise ConfigError(
            f"`accelerate launch` was asked for {asked} processes but started one (without several GPUs its plain "
            f"launcher runs a single process). Add --multi-gpu, which starts them through torch's launcher (gloo on "
            f"CPUs): accelerate launch --multi-gpu --num-processes {asked} -m cogvx train ..."
        )
    # Accelerate keeps its settings process-wide; a second run in one process (tests, notebooks) may differ.
    AcceleratorState._reset_state()
    accelerator = Accelerator(
        # Without a GPU, accelerate joins torchrun's processes (gloo) only when told to run on the CPU.
        cpu=not torch.cuda.is_available(),
        mixed_precision=ACCELERATE_PRECISION[cfg.mixed_precision],
        log_with=None if cfg.report_to == "none" else cfg.report_to,
        project_config=ProjectConfiguration(project_dir=str(cfg.output), logging_dir=str(runs.logs(cfg.output))),
    )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if accelerator.num_processes != launched:
        raise ConfigError(
            f"The launcher started {launched} processes but accelerate sees {accelerator.num_processes}: each would "
            "train alone and overwrite the others' files. Launch with `torchrun` or `accelerate launch`."
        )
    return accelerator


def _processes_asked_of_accelerate() -> int:
    """The --num-processes of an `accelerate launch` that started this process alone (1 when none did).

    accelerate's plain launcher (chosen without --multi-gpu when fewer than two GPUs are visible) runs
    one process and tells it nothing of --num-processes: only the launcher's command line says it.
    """
    if "ACCELERATE_USE_CPU" not in os.environ or "WORLD_SIZE" in os.environ:
        return 1  # not started by accelerate's plain launcher
    import psutil

    launcher = psutil.Process().parent()
    args = launcher.cmdline() if launcher is not None else []
    if not any("accelerate" in arg for arg in args[:3]):
        return 1
    for index, arg in enumerate(args):
        name, _, value = arg.partition("=")
        if name in ("--num-processes", "--num_processes"):
            value = value or (args[index + 1] if index + 1 < len(args) else "")
            return int(value) if value.isdigit() else 1
    return 1


def check_replicas_agree(accelerator, params: Sequence[torch.nn.Parameter]) -> None:
    """Data-parallel processes must end with the same LoRA; a mismatch means a silent desync."""
    if accelerator.num_processes == 1:
        return
    with torch.no_grad():
        summary = torch.stack([sum(p.double().sum() for p in params), sum(p.double().square().sum() for p in params)])
    everyone = accelerator.gather(summary.to(accelerator.device).unsqueeze(0))
    if not torch.equal(everyone, everyone[:1].expand_as(everyone)):
        raise RuntimeError(
            f"The LoRA weights differ between processes at the end of training ({everyone.tolist()}); "
            f"data-parallel training went out of sync. Please report this with the run's {runs.CONFIG_TOML}."
        )


class Timeline:
    """Seconds from this process's start to each phase of its launch (``runs.LAUNCH_PHASES``), in the order reached.

    Recorded on the first step's row of metrics.jsonl (``runs.LAUNCH``): what a slow launch spent its time on.
    """

    def __init__(self):
        self.phases: dict[str, float] = {}

    def mark(self, phase: str) -> None:
        """``phase`` reached now (its first time only: a phase is reached once per launch)."""
        self.phases.setdefault(phase, round(clock.process_seconds(), 3))
