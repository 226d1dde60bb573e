"""Axolotl trainer classes: the core trainers on top of AxolotlTrainer (optimizers, schedulers, logging,
checkpointing, reporting and Hub push stay Axolotl's)."""

from __future__ import annotations

from axolotl.core.trainers.base import AxolotlTrainer


def sdft():
    from sd_plugin.trainers.sdft import SDFTTrainer

    class AxolotlSDFTTrainer(SDFTTrainer, AxolotlTrainer):
        pass

    return AxolotlSDFTTrainer


def sdpo():
    from sd_plugin.trainers.sdpo import SDPOTrainer

    class AxolotlSDPOTrainer(SDPOTrainer, AxolotlTrainer):
        pass

    return AxolotlSDPOTrainer


def sdzero():
    from sd_plugin.trainers.sdzero import SDZeroTrainer

    class AxolotlSDZeroTrainer(SDZeroTrainer, AxolotlTrainer):
        pass

    return AxolotlSDZeroTrainer


TRAINERS = {"sdft": sdft, "sdpo": sdpo, "sdzero": sdzero}
