"""`sd-plugin` command line: each subcommand lives in the module that owns the concept.

    sd-plugin stats CORPUS.jsonl [...]        corpus statistics (sd_plugin.stats)
    sd-plugin eval-stats SCORED.jsonl [...]   evaluation metrics per model stage (sd_plugin.stats)
    sd-plugin mix ROUND1.jsonl ROUND2.jsonl   diversity-preserving round-2 mixer (sd_plugin.mixer)
    sd-plugin merge --base B --adapter A ...  merge a LoRA adapter to bf16, optional Hub push (sd_plugin.merge)
    sd-plugin plan CONFIG.yml [...]           peak-memory planner (sd_plugin.planner)
    sd-plugin collect-revisions ...           SD-Zero revision data collection (sd_plugin.revisions)
    sd-plugin generate --model M --prompts P  sample a (scored) corpus, resumable (sd_plugin.generate)
    sd-plugin demo-model [--out DIR]          SmolLM2-135M-Instruct as a local checkpoint (sd_plugin.demo_model)
"""

from __future__ import annotations

import importlib
import sys


class UsageError(Exception):
    """Bad input to a command (missing file, malformed line, unknown field or verifier): `main` prints it as one
    line `sd-plugin CMD: message` on stderr and exits with status 2. Raise it with file:line and the reason."""


# subcommand -> (module, function taking argv); modules are imported only when their command runs.
COMMANDS = {
    "stats": ("sd_plugin.stats", "stats_main"),
    "eval-stats": ("sd_plugin.stats", "eval_stats_main"),
    "mix": ("sd_plugin.mixer", "main"),
    "merge": ("sd_plugin.merge", "main"),
    "plan": ("sd_plugin.planner", "main"),
    "collect-revisions": ("sd_plugin.revisions", "main"),
    "generate": ("sd_plugin.generate", "main"),
    "demo-model": ("sd_plugin.demo_model", "main"),
}


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__.strip())
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
    sys.exit(main())
