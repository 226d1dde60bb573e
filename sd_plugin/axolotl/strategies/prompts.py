"""`type: sd_plugin.axolotl.strategies.prompts`: prompt-only rows (SDPO, SD-Zero's distill phase)."""

from sd_plugin.axolotl.strategies import PromptStrategy


def load(tokenizer, cfg, ds_cfg=None):
    return PromptStrategy(tokenizer, cfg, ds_cfg)
