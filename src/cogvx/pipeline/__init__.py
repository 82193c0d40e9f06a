"""Everything CogVideoX-specific: its components, variants, objective, LoRA, sampling, and the speed levers."""
