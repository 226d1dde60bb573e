"""`type: sd_plugin.axolotl.strategies.sdft`: prompt + demonstration records."""

from sd_plugin.axolotl.strategies import SDFTStrategy


def load(tokenizer, cfg, ds_cfg=None):
    return SDFTStrategy(tokenizer, cfg, ds_cfg, traces=False)
