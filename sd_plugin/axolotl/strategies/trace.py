"""`type: sd_plugin.axolotl.strategies.trace`: multi-turn traces, one row per assistant turn."""

from sd_plugin.axolotl.strategies import SDFTStrategy


def load(tokenizer, cfg, ds_cfg=None):
    return SDFTStrategy(tokenizer, cfg, ds_cfg, traces=True)
