"""The embedded default model (LLaVA format), shipped as package data: `shapes-llava/`."""
