"""`sd-plugin` command line: each subcommand lives in the module that owns the concept.

    sd-plugin stats CORPUS.jsonl [...]        corpus statistics (sd_plugin.stats)
    sd-plugin eval-stats SCORED.jsonl [...]   evaluation metrics per model stage (sd_plugin.stats)
    sd-plugin mix ROUND1.jsonl ROUND2.jsonl   diversity-preserving round-2 mixer (sd_plugin.mixer)
    sd-plugin merge --adapter A --out DIR     merge a LoRA adapter to bf16, optional Hub push (sd_plugin.merge)
    sd-plugin plan CONFIG.yml [...]           peak-memory planner (sd_plugin.planner)
    sd-plugin evaluate CONFIG.yml [--adapter DIR]  held-out before/after table of a saved model (sd_plugin.evaluation)
    sd-plugin collect-revisions ...           SD-Zero revision data collection (sd_plugin.revisions)
    sd-plugin generate --model M --prompts P  sample a (scored) corpus, resumable (sd_plugin.generate)
    sd-plugin demo-model [--out DIR]          SmolLM2-135M-Instruct as a local checkpoint (sd_plugin.demo_model)
    sd-plugin check-teacher CONFIG.yml        does the teacher do the task in context? per template (sd_plugin.teacher_check)
    sd-plugin --version                       the installed version

`sd-plugin CMD --help` lists a command's options with their defaults. Bad input (a missing file, a malformed
line, an unknown field or verifier, an output that would overwrite an input) is one line on stderr naming
file:line and the reason, with exit status 2.
"""

from __future__ import annotations

import argparse
import importlib
import sys


class UsageError(ValueError):
    """Bad input to a command (missing file, malformed line, unknown field or verifier): `main` prints it as one
    line `sd-plugin CMD: message` on stderr and exits with status 2. Raise it with file:line and the reason.
    A ValueError, so the Python API (`mix_corpora`, `collect_revisions`, ...) raises what it always raised."""


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows every option's default, except for options without one (None, []) and flags (False)."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default == []:
            return action.help
        return super()._get_help_string(action)


def argument_parser(command: str, description: str) -> argparse.ArgumentParser:
    """The parser every subcommand's `main(argv)` starts from: `sd-plugin COMMAND` as prog, defaults in --help."""
    return argparse.ArgumentParser(prog=f"sd-plugin {command}", description=description, formatter_class=HelpFormatter)



# subcommand -> (module, function taking argv); modules are imported only when their command runs.
COMMANDS = {
    "stats": ("sd_plugin.stats", "stats_main"),
    "eval-stats": ("sd_plugin.stats", "eval_stats_main"),
    "mix": ("sd_plugin.mixer", "main"),
    "merge": ("sd_plugin.merge", "main"),
    "plan": ("sd_plugin.planner", "main"),
    "evaluate": ("sd_plugin.evaluation", "main"),
    "collect-revisions": ("sd_plugin.revisions", "main"),
    "generate": ("sd_plugin.generate", "main"),
    "demo-model": ("sd_plugin.demo_model", "main"),
    "check-teacher": ("sd_plugin.teacher_check", "main"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
        return 0
    if argv[0] in ("-V", "--version"):
        from sd_plugin import __version__

        print(f"sd-plugin {__version__}")
        return 0
    if argv[0] not in COMMANDS:
        print(f"sd-plugin: unknown command {argv[0]!r}; choose from {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    module_name, function_name = COMMANDS[argv[0]]
    function = getattr(importlib.import_module(module_name), function_name)
    try:
        return int(function(argv[1:]) or 0)
    except UsageError as error:
        print(f"sd-plugin {argv[0]}: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    # `python -m sd_plugin.cli`: run the package's copy of this module, whose UsageError the commands raise
    from sd_plugin.cli import main as package_main

    sys.exit(package_main())
