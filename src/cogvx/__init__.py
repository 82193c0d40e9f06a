"""cogvx: LoRA fine-tuning for CogVideoX from a reusable latent cache."""

__version__ = "0.1.0"
