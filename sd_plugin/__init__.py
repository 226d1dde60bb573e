"""sd-plugin: on-policy self-distillation (SDFT, SDPO, SD-Zero) for Axolotl and plain transformers."""

from __future__ import annotations

__version__ = "0.1.0"

# Trainers pull in transformers; the Axolotl plugin pulls in axolotl. Both load on first access so that
# `import sd_plugin` stays cheap and works without the optional extras.
_LAZY = {
    "SDFTConfig": "sd_plugin.trainers.sdft",
    "SDFTTrainer": "sd_plugin.trainers.sdft",
    "SDPOConfig": "sd_plugin.trainers.sdpo",
    "SDPOTrainer": "sd_plugin.trainers.sdpo",
    "SDZeroConfig": "sd_plugin.trainers.sdzero",
    "SDZeroTrainer": "sd_plugin.trainers.sdzero",
    "SelfDistillationPlugin": "sd_plugin.axolotl.plugin",
    "DivergenceOptions": "sd_plugin.losses",
    "divergence": "sd_plugin.losses",
    "chunked_distillation_loss": "sd_plugin.losses",
}

__all__ = sorted(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sd_plugin' has no attribute {name!r}")
