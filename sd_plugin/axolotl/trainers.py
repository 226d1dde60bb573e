"""Axolotl trainer classes: the core trainers on top of AxolotlTrainer (optimizers, schedulers, logging,
checkpointing, reporting and Hub push stay Axolotl's)."""

from __future__ import annotations

from axolotl.core.trainers.base import AxolotlTrainer
from transformers import Trainer


class WithoutPerplexity(Trainer):
    """Drops the `ppl` / `eval_ppl` that AxolotlTrainer.log adds as exp(loss): the loss of these trainers is a
    divergence between two models' distributions, not a cross-entropy on data, so its exponential is no
    perplexity; and, on CPU, Axolotl's `memory/*` GPU metrics (always 0 there). Sits after AxolotlTrainer in the
    bases, so its `log` runs once Axolotl's has added them."""

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs.pop("ppl", None)
        logs.pop("eval_ppl", None)
        if getattr(getattr(self.args, "device", None), "type", "cpu") == "cpu":
            # Axolotl logs its GPU memory metrics as 0 when there is no GPU: a 0 that reads like a measurement.
            for key in [key for key in logs if key.startswith("memory/")]:
                logs.pop(key)
        super().log(logs, start_time)


def sdft():
    from sd_plugin.trainers.sdft import SDFTTrainer

    class AxolotlSDFTTrainer(SDFTTrainer, AxolotlTrainer, WithoutPerplexity):
        pass

    return AxolotlSDFTTrainer


def sdpo():
    from sd_plugin.trainers.sdpo import SDPOTrainer

    class AxolotlSDPOTrainer(SDPOTrainer, AxolotlTrainer, WithoutPerplexity):
        pass

    return AxolotlSDPOTrainer


def sdzero():
    from sd_plugin.trainers.sdzero import SDZeroTrainer

    class AxolotlSDZeroTrainer(SDZeroTrainer, AxolotlTrainer, WithoutPerplexity):
        pass

    return AxolotlSDZeroTrainer


TRAINERS = {"sdft": sdft, "sdpo": sdpo, "sdzero": sdzero}
