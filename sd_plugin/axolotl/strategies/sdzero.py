"""`type: sd_plugin.axolotl.strategies.sdzero`: SD-Zero's kept revisions for `sdzero.phase: srt`.

Rows come from `sd-plugin collect-revisions` ({"prompt", "system"?, "tools"?, "y_init", "control_phrase",
"y_revised"}); each becomes a revision row and/or a generation row (`sdzero.srt_objective`), see
`sd_plugin.rows.srt_rows`. Phase distill reads prompt rows (`type: sd_plugin.axolotl.strategies.prompts`).
"""

from sd_plugin.axolotl.strategies import RowStrategy
from sd_plugin.rows import srt_rows


class SRTStrategy(RowStrategy):
    """Kept revisions -> `input_ids` (the context) + `completion_ids` (the cross-entropy targets)."""

    output_columns = ("completion_ids", "srt_objective")

    def __init__(self, tokenizer, cfg, ds_cfg):
        super().__init__(tokenizer, cfg, ds_cfg)
        if self.method != "sdzero" or self.options.phase != "srt":
            raise ValueError(
                f"type sd_plugin.axolotl.strategies.sdzero holds SD-Zero revision rows for trainer_type: sdzero with "
                f"sdzero.phase: srt (this config: trainer_type {self.method}, phase {getattr(self.options, 'phase', None)}); "
                "phase distill reads type sd_plugin.axolotl.strategies.prompts"
            )

    def rows_for(self, row: dict, where: str) -> list[dict]:
        return srt_rows(self.tokenizer, row, None, self.columns, self.options)


def load(tokenizer, cfg, ds_cfg=None):
    return SRTStrategy(tokenizer, cfg, ds_cfg)
