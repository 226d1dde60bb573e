"""The README's option tables list exactly the options the code has: a renamed or added field fails here."""

import re
from dataclasses import fields
from pathlib import Path

from sd_plugin.trainers.base import SelfDistillationOptions
from sd_plugin.trainers.sdft import SDFTOptions
from sd_plugin.trainers.sdpo import SDPOOptions

README = (Path(__file__).resolve().parents[1] / "README.md").read_text()


def table_keys(after: str) -> set[str]:
    """Backticked names in the first column of the first table after the line containing `after`."""
    lines = README[README.index(after):].splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    keys = set()
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        keys |= set(re.findall(r"`([a-z_0-9]+)`", line.split("|")[1]))
    return keys


def names(options) -> set[str]:
    return {f.name for f in fields(options)}


def test_sdft_table_lists_every_sdft_option_and_nothing_else():
    assert table_keys("Every key of the `sdft:` block") == names(SDFTOptions)


def test_sdpo_table_lists_every_sdpo_only_option():
    keys = table_keys("Keys of the `sdpo:` block")
    assert names(SDPOOptions) - names(SelfDistillationOptions) <= keys
    assert keys <= names(SDPOOptions)
