"""`plugins: [sd_plugin.SelfDistillationPlugin]`: Axolotl hooks, each inert unless `trainer_type` is set."""

from __future__ import annotations

import logging

from axolotl.integrations.base import BasePlugin

# Axolotl shows INFO only from loggers under "axolotl": the binding logs there so users see it ran.
LOG = logging.getLogger("axolotl.sd_plugin")
# Keys that change the prepared dataset: Axolotl's cache hash must see them.
DATASET_KEYS = ("trainer_type", "sdft", "sdpo", "sdzero", "round2_mixer")


def seed_everything(cfg) -> None:
    """Seed Python, NumPy and torch with the run's seed (TrainingArguments' default 42 when unset)."""
    if not cfg.get("trainer_type"):
        return
    from transformers import set_seed

    set_seed(cfg.get("seed") if cfg.get("seed") is not None else 42)


class SelfDistillationPlugin(BasePlugin):
    """SDFT / SDPO / SD-Zero trainers for Axolotl, selected by `trainer_type`."""

    def get_input_args(self):
        return "sd_plugin.axolotl.args.SelfDistillationArgs"

    def get_training_args_mixin(self):
        return "sd_plugin.axolotl.args.SelfDistillationTrainingArgs"

    def register(self, cfg):
        from axolotl.utils.data import shared

        missing = tuple(k for k in DATASET_KEYS if k not in shared.DATASET_HASH_CONFIG_EXTRA_FIELDS)
        shared.DATASET_HASH_CONFIG_EXTRA_FIELDS = tuple(shared.DATASET_HASH_CONFIG_EXTRA_FIELDS) + missing
        if cfg.get("round2_mixer"):
            # Runs before datasets load: a `datasets:` entry reads the mixed file at round2_mixer.output_path.
            from sd_plugin.mixer import mix_from_config

            path = mix_from_config(dict(cfg["round2_mixer"]))
            LOG.info("sd-plugin: round2_mixer wrote %s", path)

    def pre_model_load(self, cfg):
        seed_everything(cfg)

    def pre_lora_load(self, cfg, model):
        # Axolotl creates the adapter before the HF Trainer seeds: without this, the same config and seed give
        # a different LoRA initialisation every run, and runs cannot be compared or checked after a resume.
        seed_everything(cfg)

    def get_training_args(self, cfg):
        if not cfg.trainer_type:
            return None
        return {"sd_options": dict(cfg[cfg.trainer_type] or {}), "remove_unused_columns": False}

    def get_trainer_cls(self, cfg):
        if not cfg.trainer_type:
            return None
        from sd_plugin.axolotl import trainers

        LOG.info("sd-plugin: training with trainer_type=%s", cfg.trainer_type)
        return trainers.TRAINERS[cfg.trainer_type]()

    def get_collator_cls_and_kwargs(self, cfg, is_eval=False):
        if not cfg.trainer_type:
            return None
        from sd_plugin.rows import SelfDistillationCollator

        return SelfDistillationCollator, {}

    def post_trainer_create(self, cfg, trainer):
        if cfg.get("trainer_type"):
            self.trainer = trainer  # post_train gets the model only; its record (state, arguments) lives here

    def post_train(self, cfg, model):
        """Write `training_config.json` (this Axolotl config, secrets masked) and `trainer_state.json` (the logged
        metrics) into `output_dir`, where `sd-plugin merge` finds them for the model card.

        Axolotl saves the adapter with `model.save_pretrained`, so the trainer's own `save_model` (which writes
        both in the standalone API) never runs. Axolotl calls this hook after training and again after the save;
        writing both times is harmless. Inert without `trainer_type`.
        """
        trainer = getattr(self, "trainer", None)
        if not cfg.get("trainer_type") or trainer is None or not trainer.args.should_save:
            return None
        from sd_plugin.model_card import as_plain_dict, write_training_record

        record = as_plain_dict(cfg)
        if hasattr(trainer, "extra_training_record"):  # SDFT: the teacher check, and the template auto chose
            record.update(trainer.extra_training_record())
        write_training_record(cfg.output_dir, record, trainer.state)
        return None

    def post_lora_merge(self, cfg, adapter_path, output_path):
        """After `axolotl merge-lora` (Axolotl 0.21+; 0.19 never calls it): dtype check and model card.

        Checks every tensor the merge wrote in `output_path` (16/32-bit floats are cast to bfloat16 in place;
        quantized ones are refused with a pointer to `--dequant`) and writes the model card (method, options,
        datasets, LoRA settings) as `output_path/README.md`. Nothing is pushed. Inert without `trainer_type`.
        """
        if not cfg.get("trainer_type"):
            return None
        from sd_plugin.axolotl.merge_hook import post_lora_merge

        report = post_lora_merge(cfg, adapter_path, output_path, log=LOG.info)
        LOG.info("sd-plugin: merged model in %s: %s; model card %s",
                 output_path, ", ".join(f"{count} {name}" for name, count in sorted(report.tensor_dtypes.items())),
                 report.card)
        return None
