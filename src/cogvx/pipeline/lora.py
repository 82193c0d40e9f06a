"""LoRA adapters on the CogVideoX transformer, saved in the format diffusers loads."""

from __future__ import annotations

from pathlib import Path

import torch

from cogvx import files, runs
from cogvx.errors import ConfigError, ModelError
from cogvx.names import DEFAULT_TARGETS  # noqa: F401 (re-exported)


def add_lora(
    transformer: torch.nn.Module,
    rank: int,
    alpha: float,
    targets: tuple[str, ...],
    dropout: float,
) -> list[torch.nn.Parameter]:
    """Add a LoRA adapter and return its parameters in float32 (master weights); the base model is frozen.

    peft itself marks only the adapter trainable, and refuses targets that match no module with a
    message naming them, raised here as a ConfigError (``--targets`` is the user's).
    """
    from peft import LoraConfig

    config = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(targets), lora_dropout=dropout, init_lora_weights=True
    )
    try:
        transformer.add_adapter(config)
    except ValueError as err:
        if "not found in the base model" not in str(err):  # peft's words for targets that match no module
            raise
        raise ConfigError(str(err)) from err
    params = [p for p in transformer.parameters() if p.requires_grad]
    for p in params:
        p.data = p.data.float()
    return params


def lora_state_dict(transformer: torch.nn.Module) -> dict[str, torch.Tensor]:
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().cpu().contiguous() for k, v in get_peft_model_state_dict(transformer).items()}


def load_lora_state(transformer: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    """Put saved LoRA weights back into a transformer that already has the same adapter."""
    from peft.utils import set_peft_model_state_dict

    result = set_peft_model_state_dict(transformer, state)
    if result.unexpected_keys:
        raise ModelError(f"LoRA weights do not fit this transformer: {result.unexpected_keys[:3]} ...")


class LoraState:
    """The LoRA of a transformer as a checkpoint component (``state_dict`` / ``load_state_dict``)."""

    def __init__(self, transformer: torch.nn.Module):
        self.transformer = transformer

    def state_dict(self) -> dict[str, torch.Tensor]:
        return lora_state_dict(self.transformer)

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        load_lora_state(self.transformer, state)


def save_lora(transformer: torch.nn.Module, folder: Path) -> Path:
    """Write ``pytorch_lora_weights.safetensors`` (``runs.lora_weights``) with the adapter config in its metadata.

    The metadata carries rank and alpha, so ``CogVideoXPipeline.load_lora_weights`` applies the same
    scale as training did, with no manual ``alpha / rank`` on the user's side.
    """
    from diffusers import CogVideoXPipeline

    adapter = transformer.peft_config["default"].to_dict()
    CogVideoXPipeline.save_lora_weights(
        Path(folder),
        transformer_lora_layers=lora_state_dict(transformer),
        transformer_lora_adapter_metadata=adapter,
        weight_name=runs.LORA_WEIGHTS,
    )
    files.follow_umask(runs.lora_weights(folder))  # safetensors writes 0600; the LoRA is meant to be shared
    return runs.lora_weights(folder)
