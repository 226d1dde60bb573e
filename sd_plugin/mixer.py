"""Diversity-preserving corpus mixer for iterated self-distillation.

A round-2 corpus sampled from the round-1 model tends to collapse onto fewer templates (88 of 540
instead of 171) and the round-2 model loses the ability to tell good from bad scenarios even though
its mean reward rises. The mixer builds the next training corpus from all rounds so far:

1. drop invalid rows (refuse unless `skip_invalid`), rows under the reward floor, and near duplicates;
2. take one row from as many groups (templates) as the size target allows, from earlier rounds and
   the latest round in the proportion `mix_in_ratio` as far as coverage permits;
3. fill the rest round-robin over groups, fewest-taken first, never above `group_cap` per group.

Everything is seeded; each output row is its source row plus a `_provenance` field.
"""

from __future__ import annotations

import hashlib
import heapq
import json
import math
import sys
from collections import Counter, defaultdict
from collections.abc import Callable, Hashable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from sd_plugin.cli import UsageError, argument_parser
from sd_plugin.dedup import near_duplicates
from sd_plugin.files import (
    RowError,
    read_jsonl,
    refuse_missing_field,
    refuse_output_over_input,
    row_error_lines,
    write_files_atomic,
    write_text_atomic,  # noqa: F401  (one atomic writer for every command: tests check it)
)
from sd_plugin.option_checks import check_option_types
from sd_plugin.stats import (
    CORPUS_TABLE_ROWS,
    DEFAULT_GROUP_FIELD,
    TEXT_FIELD_CANDIDATES,
    corpus_stats,
    format_table,
    reward_error,
    row_groups,
    row_text,
)


@dataclass(frozen=True)
class CorpusSource:
    """One input corpus: a JSONL path and the self-distillation round that produced it."""

    path: str
    round: int


@dataclass
class MixConfig:
    """How to mix. Defaults keep every latest-round row and add earlier rounds as half of the output."""

    size: int | None = None  # output rows; None: eligible latest-round rows / (1 - mix_in_ratio), at most all
    seed: int = 0
    mix_in_ratio: float = 0.5  # target share of output rows from earlier rounds (coverage comes first)
    group_cap: int | None = None  # at most this many output rows per group; None: no cap
    group_field: str | None = None  # None: template_id when rows have it, else near-duplicate clusters of the text
    reward_field: str = "reward"
    reward_floor: float | None = None  # drop rows whose (diversity-penalised) reward is below this
    diversity_penalty: float = 0.0  # floor test on reward - penalty * log2(group size / mean group size)
    dedup_threshold: float | None = 0.8  # word-3-gram Jaccard at which rows are near duplicates; None: off
    text_field: str | None = None  # None: first of text, completion, demonstration, y_revised, messages
    catalog_size: int | None = None  # number of possible groups, only for coverage in the summary
    skip_invalid: bool = False  # False: any malformed row aborts the mix


@dataclass
class Candidate:
    """A valid input row with what the selection needs to know about it."""

    union_index: int  # position among all valid rows of all sources
    source_index: int
    round: int
    line: int
    row: dict
    reward: float
    group: str


@dataclass
class MixResult:
    """Output rows (with `_provenance`), rejected rows, counts of what was dropped, and the before/after summary."""

    rows: list[dict]
    rejects: list[RowError]
    counts: dict
    summary: dict
    warnings: list[str] = field(default_factory=list)


class MixError(ValueError):
    """Raised when inputs hold malformed rows and `skip_invalid` is off; `errors` lists them all."""

    def __init__(self, errors: list[RowError]):
        self.errors = errors
        shown = "\n".join(f"  {line}" for line in row_error_lines(errors))
        message = f"{len(errors)} malformed row(s); refusing to mix (--skip-invalid / skip_invalid: true drops them)"
        super().__init__(f"{message}:\n{shown}")


# ----------------------------------------------------------------------------- diversity-penalised reward
def diversity_penalty(group_count: int, mean_group_count: float, penalty: float) -> float:
    """`penalty * max(0, log2(group_count / mean_group_count))`: zero for a group at or under the average
    size, `penalty` for a group twice the average, `2 * penalty` at four times (logarithmic, so a collapsed
    group is pushed down without the penalty swamping the reward scale)."""
    if mean_group_count <= 0 or group_count <= mean_group_count:
        return 0.0
    return penalty * math.log2(group_count / mean_group_count)


class DiversityPenalizedReward:
    """Wrap a reward `(prompt, completion, record) -> (reward, feedback | None)` so that samples from groups
    already over-represented among the samples scored so far get less reward.

    Each call counts the sample's group (`group_fn(prompt, completion, record)`, default
    `record[group_field]`), then returns `base reward - diversity_penalty(count of that group, expected
    count, penalty)` and the base feedback unchanged. The expected count is the samples so far spread over
    `num_groups` (e.g. the catalog size) when given, else over the groups seen so far (then a stream of a
    single group is not penalised), and at least 1, so the first sample of a group is never penalised.
    Usable as an SDPO reward function and for rejection sampling (score candidates, keep those above a floor).
    """

    def __init__(self, base_reward_fn: Callable, penalty: float = 0.1, group_fn: Callable | None = None,
                 group_field: str = "template_id", num_groups: int | None = None):
        self.base_reward_fn = base_reward_fn
        self.penalty = penalty
        self.group_fn = group_fn or (lambda prompt, completion, record: (record or {}).get(group_field))
        self.num_groups = num_groups
        self.counts: Counter = Counter()

    def __call__(self, prompt, completion, record=None) -> tuple[float, str | None]:
        reward, feedback = self.base_reward_fn(prompt, completion, record)
        group = self.group_fn(prompt, completion, record)
        key = group if isinstance(group, Hashable) else json.dumps(group, sort_keys=True, default=str)
        self.counts[key] += 1
        count = self.counts[key]
        expected_count = max(1.0, sum(self.counts.values()) / (self.num_groups or len(self.counts)))
        return float(reward) - diversity_penalty(count, expected_count, self.penalty), feedback

    def reset(self) -> None:
        """Forget the groups counted so far (e.g. at the start of a new rejection-sampling batch)."""
        self.counts.clear()


# ------------------------------------------------------------------------------------------- selection
def take_round_robin(by_group: dict[str, list[Candidate]], wanted: int, taken: Counter, group_cap: int | None,
                     group_order: dict[str, int], selected: list[Candidate]) -> None:
    """Append up to `wanted` rows from `by_group` to `selected`, always from the group with the fewest rows taken
    so far (over the whole output; ties by the seeded `group_order`) and never above `group_cap`."""
    heap = [(taken[g], group_order[g], g) for g, rows in by_group.items()
            if rows and (group_cap is None or taken[g] < group_cap)]
    heapq.heapify(heap)
    while heap and wanted > 0:
        _, order, group = heapq.heappop(heap)
        selected.append(by_group[group].pop())
        taken[group] += 1
        wanted -= 1
        if by_group[group] and (group_cap is None or taken[group] < group_cap):
            heapq.heappush(heap, (taken[group], order, group))


def select_rows(earlier: list[Candidate], latest: list[Candidate], size: int, mix_in_ratio: float,
                group_cap: int | None, rng: np.random.Generator) -> list[Candidate]:
    """Pick `size` rows maximising group coverage first, then matching the earlier-round share `mix_in_ratio`.

    Phase 1 takes one row from min(size, number of groups) distinct groups. Groups only in the earlier
    rounds must come from there, groups only in the latest round from there, and groups in both go to
    whichever side brings the earlier-round count closest to its quota. Phase 2 fills the earlier-round
    quota, then the latest round, then tops up from the earlier rounds if the latest ran short, each by
    `take_round_robin`.
    """
    pools = []
    for pool in (earlier, latest):
        by_group = defaultdict(list)
        for index in rng.permutation(len(pool)):
            by_group[pool[index].group].append(pool[index])
        pools.append(by_group)

    def shuffled(groups) -> list[str]:
        groups = sorted(groups)  # sets of str iterate in a hash-seed dependent order
        return [groups[i] for i in rng.permutation(len(groups))]

    only_earlier = shuffled(pools[0].keys() - pools[1].keys())
    only_latest = shuffled(pools[1].keys() - pools[0].keys())
    shared = shuffled(pools[0].keys() & pools[1].keys())
    group_order = {group: rank for rank, group in enumerate(shuffled(pools[0].keys() | pools[1].keys()))}
    earlier_quota = round(size * mix_in_ratio)

    covered = min(size, len(only_earlier) + len(only_latest) + len(shared))
    lowest = max(0, covered - len(only_latest) - len(shared))
    highest = min(covered, len(only_earlier) + len(shared))
    earlier_in_phase1 = min(max(earlier_quota, lowest), highest)
    from_only_earlier = min(len(only_earlier), earlier_in_phase1)
    shared_to_earlier = earlier_in_phase1 - from_only_earlier
    from_only_latest = min(len(only_latest), covered - earlier_in_phase1)
    shared_to_latest = covered - earlier_in_phase1 - from_only_latest
    shared_latest_end = shared_to_earlier + shared_to_latest
    first_picks = ([(0, g) for g in only_earlier[:from_only_earlier] + shared[:shared_to_earlier]]
                   + [(1, g) for g in only_latest[:from_only_latest] + shared[shared_to_earlier:shared_latest_end]])

    selected, taken = [], Counter()
    for pool_index, group in first_picks:
        selected.append(pools[pool_index][group].pop())
        taken[group] += 1
    earlier_wanted = min(size - covered, max(0, earlier_quota - earlier_in_phase1))
    take_round_robin(pools[0], earlier_wanted, taken, group_cap, group_order, selected)
    take_round_robin(pools[1], size - len(selected), taken, group_cap, group_order, selected)
    take_round_robin(pools[0], size - len(selected), taken, group_cap, group_order, selected)
    return selected


# ------------------------------------------------------------------------------------------------ mixing
def mix_corpora(sources: list[CorpusSource], config: MixConfig) -> MixResult:
    """Mix the corpora of several rounds into one training corpus (see the module docstring for the steps).

    The latest round is the highest `round` among the sources; every other source counts as an earlier
    round. Raises `MixError` listing every malformed row (file:line) unless `config.skip_invalid`.
    """
    if not sources:
        raise ValueError("no input corpora")
    check_option_types(config)  # e.g. round2_mixer: {mix_in_ratio: "0.5"} names the key, not a TypeError
    if not 0.0 <= config.mix_in_ratio <= 1.0:
        raise ValueError(f"mix_in_ratio must be in [0, 1], got {config.mix_in_ratio}")
    if config.group_cap is not None and config.group_cap < 1:
        raise ValueError(f"group_cap must be >= 1, got {config.group_cap}")
    if config.size is not None and config.size < 0:
        raise ValueError(f"size must be >= 0, got {config.size}")
    if config.dedup_threshold is not None and not 0.0 < config.dedup_threshold <= 1.0:
        raise ValueError(f"dedup_threshold must be in (0, 1], got {config.dedup_threshold}")

    resolved = [Path(source.path).resolve() for source in sources]
    if len(set(resolved)) < len(resolved):
        raise ValueError("an input corpus is given twice; its rows would be emitted twice")

    valid, rejects = [], []  # valid: (source_index, line, row); rejects in input order, then line order
    for source_index, source in enumerate(sources):
        numbered_rows, errors = read_jsonl(source.path)
        for line, row in numbered_rows:
            message = reward_error(row, config.reward_field)
            if message:
                errors.append(RowError(source.path, line, message, json.dumps(row, ensure_ascii=False)))
            else:
                valid.append((source_index, line, row))
        rejects.extend(sorted(errors, key=lambda error: error.line))
    if rejects and not config.skip_invalid:
        raise MixError(rejects)

    # near duplicates over the union, once: for the groups when there is no group field (clusters shared by all
    # rounds), for the dedup, and for the summary's near-duplicate rates of every subset
    union_rows = [row for _, _, row in valid]
    # a named field must exist: a typo would silently find no text (no near duplicates) or fall back to clusters
    for key in ("text_field", "group_field"):
        if getattr(config, key) is not None:
            option = f"{key} / --{key.replace('_', '-')}"
            refuse_missing_field(union_rows, getattr(config, key), option, "the input corpora")
    texts = [row_text(row, config.text_field) for row in union_rows]
    structure = near_duplicates(texts, config.dedup_threshold or 0.8)
    groups, group_source = row_groups(union_rows, config.group_field, structure)
    candidates = [Candidate(index, s, sources[s].round, line, row, float(row[config.reward_field]), group)
                  for index, ((s, line, row), group) in enumerate(zip(valid, groups))]

    eligible = candidates
    if config.reward_floor is not None:
        group_sizes = Counter(groups)
        mean_group_size = len(groups) / max(1, len(group_sizes))
        eligible = [c for c in candidates if c.reward >= config.reward_floor + diversity_penalty(
            group_sizes[c.group], mean_group_size, config.diversity_penalty)]
    below_floor = len(candidates) - len(eligible)

    if config.dedup_threshold is not None:
        # keep the best of each near-duplicate set: higher reward, then newer round, then input order
        ranked = sorted(eligible, key=lambda c: (-c.reward, -c.round, c.source_index, c.line))
        kept_rows = set(structure.keep_first([c.union_index for c in ranked]))
        kept = [c for c in ranked if c.union_index in kept_rows]
        near_duplicates_removed = len(eligible) - len(kept)
        eligible = sorted(kept, key=lambda c: (c.source_index, c.line))
    else:
        near_duplicates_removed = 0

    latest_round = max(source.round for source in sources)
    earlier = [c for c in eligible if c.round < latest_round]
    latest = [c for c in eligible if c.round == latest_round]
    if config.size is not None:
        size = config.size
    elif config.mix_in_ratio >= 1.0:
        size = len(eligible)
    else:
        size = min(len(eligible), round(len(latest) / (1.0 - config.mix_in_ratio)))
    rng = np.random.default_rng(config.seed)
    selected = select_rows(earlier, latest, size, config.mix_in_ratio, config.group_cap, rng)
    selected.sort(key=lambda c: (c.source_index, c.line))

    warnings = []
    if len(selected) < size:
        warnings.append(f"size target {size} not reached: {len(selected)} rows available under the filters and cap")
    if rejects:
        warnings.append(f"skipped {len(rejects)} malformed row(s)")
    output_rows = []
    for c in selected:
        provenance = {"source": sources[c.source_index].path, "round": c.round, "line": c.line}
        if "_provenance" in c.row:  # an input that is itself a mix keeps its history
            provenance["previous"] = c.row["_provenance"]
        output_rows.append({**c.row, "_provenance": provenance})

    counts = {
        "valid": len(candidates), "invalid": len(rejects), "below_reward_floor": below_floor,
        "near_duplicates_removed": near_duplicates_removed, "eligible_earlier": len(earlier),
        "eligible_latest": len(latest), "size_target": size, "selected": len(selected),
        "selected_by_round": {str(r): n for r, n in sorted(Counter(c.round for c in selected).items())},
    }

    def stats_of(chosen: list[Candidate], name: str) -> dict:
        flags = structure.has_near_duplicate([c.union_index for c in chosen])
        return corpus_stats([c.row for c in chosen], name, config.group_field, config.reward_field, config.text_field,
                            config.catalog_size, structure.threshold, [c.group for c in chosen], flags)

    before = [stats_of([c for c in candidates if c.source_index == s], Path(source.path).name)
              for s, source in enumerate(sources)]
    summary = {
        "sources": [asdict(source) for source in sources],
        "config": asdict(config),
        "group_source": group_source,
        "counts": counts,
        "before": before + [stats_of(candidates, "union")],
        "after": stats_of(selected, "mixed"),
        "warnings": warnings,
    }
    return MixResult(output_rows, rejects, counts, summary, warnings)


def jsonl_text(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def write_mix_outputs(result: MixResult, output_path: str | Path, rejects_path: str | Path | None = None,
                      summary_path: str | Path | None = None) -> None:
    """Write the mixed corpus, and optionally the rejected rows (JSONL) and the summary (JSON), as one set.

    `write_files_atomic`: all three are complete on disk before any is renamed into place, and the old rejects and
    summary are removed before the new corpus replaces the old one, so an interrupted run never leaves a new corpus
    beside the summary of an earlier mix. The summary names the corpus it describes (`output`: path, rows, sha256).
    """
    corpus = jsonl_text(result.rows).encode("utf-8")
    files = [(output_path, corpus)]
    if rejects_path:
        files.append((rejects_path, jsonl_text([asdict(error) for error in result.rejects]).encode("utf-8")))
    if summary_path:
        summary = {**result.summary, "output": {"path": str(output_path), "rows": len(result.rows),
                                                "sha256": hashlib.sha256(corpus).hexdigest()}}
        files.append((summary_path, (json.dumps(summary, indent=2, ensure_ascii=False) + "\n").encode("utf-8")))
    write_files_atomic(files)


def format_summary(result: MixResult) -> str:
    """Before/after statistics table plus the selection counts."""
    summary, counts = result.summary, result.counts
    columns = [(stats["name"], stats) for stats in summary["before"]] + [("mixed", summary["after"])]
    by_round = ", ".join(f"round {r}: {n}" for r, n in counts["selected_by_round"].items())
    lines = [
        format_table(columns, CORPUS_TABLE_ROWS),
        f"groups from {summary['group_source']}",
        f"selected {counts['selected']} of target {counts['size_target']} ({by_round}); "
        f"removed: {counts['invalid']} invalid, {counts['below_reward_floor']} below reward floor, "
        f"{counts['near_duplicates_removed']} near duplicates",
    ]
    return "\n".join(lines + [f"warning: {warning}" for warning in result.warnings])


def mix_from_config(block: dict) -> str:
    """Run the mixer from the Axolotl `round2_mixer:` block and return the path of the mixed JSONL.

    Keys: `inputs` (list of `{path, round}` or plain paths, round = position + 1 when omitted), `output_path`,
    optional `summary_path` and `rejects_path`, and any `MixConfig` field (size, seed, mix_in_ratio,
    group_cap, group_field, reward_field, reward_floor, dedup_threshold, text_field, ...). Unknown keys
    raise ValueError; malformed rows raise MixError (and nothing is written).
    """
    settings = dict(block)
    inputs = settings.pop("inputs")
    output_path = str(settings.pop("output_path"))
    summary_path = settings.pop("summary_path", None)
    rejects_path = settings.pop("rejects_path", None)
    unknown = sorted(set(settings) - {f.name for f in fields(MixConfig)})
    if unknown:
        raise ValueError(f"round2_mixer: unknown key(s) {unknown}")
    sources = [CorpusSource(str(item["path"]), int(item.get("round", index + 1))) if isinstance(item, dict)
               else CorpusSource(str(item), index + 1) for index, item in enumerate(inputs)]
    outputs = {"round2_mixer.output_path": output_path, "round2_mixer.summary_path": summary_path,
               "round2_mixer.rejects_path": rejects_path}
    refuse_output_over_input(outputs, [source.path for source in sources])
    result = mix_corpora(sources, MixConfig(**settings))
    write_mix_outputs(result, output_path, rejects_path, summary_path)
    return output_path


def main(argv: list[str] | None = None) -> int:
    """`sd-plugin mix ROUND1.jsonl ROUND2.jsonl ... --out MIXED.jsonl`."""
    defaults = MixConfig()
    parser = argument_parser("mix", "Diversity-preserving mix of self-distillation rounds.")
    parser.add_argument("inputs", nargs="+", help="corpora, earliest round first (or give --rounds)")
    parser.add_argument("--out", required=True, help="mixed JSONL (written only if the mix succeeds)")
    parser.add_argument("--rounds", default=None, help="comma-separated round per input (default: 1, 2, ...)")
    parser.add_argument("--size", type=int, default=None,
                        help="output rows (default: eligible latest-round rows / (1 - ratio), at most all eligible)")
    parser.add_argument("--seed", type=int, default=defaults.seed, help="selection seed")
    parser.add_argument("--mix-in-ratio", type=float, default=defaults.mix_in_ratio, help="share of earlier-round rows")
    parser.add_argument("--group-cap", type=int, default=None, help="max rows per group")
    parser.add_argument("--group-field", default=None,
                        help=f"field naming each row's group (default: {DEFAULT_GROUP_FIELD} when rows have it, else "
                             "near-duplicate clusters of the texts)")
    parser.add_argument("--reward-field", default=defaults.reward_field, help="numeric reward field (every row needs it)")
    parser.add_argument("--text-field", default=None,
                        help=f"text compared for near duplicates (default: first of {', '.join(TEXT_FIELD_CANDIDATES)})")
    parser.add_argument("--reward-floor", type=float, default=None, help="drop rows whose reward is below this")
    parser.add_argument("--diversity-penalty", type=float, default=defaults.diversity_penalty,
                        help="test the floor on reward - P * log2(group size / mean group size)")
    parser.add_argument("--dedup-threshold", type=float, default=defaults.dedup_threshold,
                        help="word-3-gram Jaccard at which rows are near duplicates")
    parser.add_argument("--no-dedup", action="store_true", help="keep near duplicates")
    parser.add_argument("--catalog-size", type=int, default=None, help="number of possible groups (summary only)")
    parser.add_argument("--skip-invalid", action="store_true", help="drop malformed rows instead of refusing")
    parser.add_argument("--rejects", default=None, help="JSONL of the dropped malformed rows (with --skip-invalid)")
    parser.add_argument("--summary", default=None, help="before/after statistics as JSON")
    parser.add_argument("--force", action="store_true", help="allow an output to overwrite an input file")
    args = parser.parse_args(argv)
    refuse_output_over_input({"--out": args.out, "--rejects": args.rejects, "--summary": args.summary}, args.inputs,
                             args.force)

    try:
        rounds = [int(r) for r in args.rounds.split(",")] if args.rounds else list(range(1, len(args.inputs) + 1))
    except ValueError:
        raise UsageError(f"--rounds {args.rounds!r}: expected comma-separated integers") from None
    if len(rounds) != len(args.inputs):
        raise UsageError(f"{len(rounds)} --rounds for {len(args.inputs)} inputs")
    config = MixConfig(size=args.size, seed=args.seed, mix_in_ratio=args.mix_in_ratio, group_cap=args.group_cap,
                       group_field=args.group_field, reward_field=args.reward_field, reward_floor=args.reward_floor,
                       diversity_penalty=args.diversity_penalty,
                       dedup_threshold=None if args.no_dedup else args.dedup_threshold,
                       text_field=args.text_field, catalog_size=args.catalog_size, skip_invalid=args.skip_invalid)
    try:
        result = mix_corpora([CorpusSource(path, r) for path, r in zip(args.inputs, rounds)], config)
    except MixError as error:
        print("\n".join(f"  {line}" for line in row_error_lines(error.errors)), file=sys.stderr)
        raise UsageError(f"{error.errors[0]} ({len(error.errors)} malformed row(s); --skip-invalid drops them); "
                         f"nothing written to {args.out}") from None
    except ValueError as error:  # UsageError included: a missing file, an unknown field, a bad setting
        raise UsageError(f"{error}; nothing written to {args.out}") from None
    if result.rejects:
        print("skipped rows:\n" + "\n".join(f"  {line}" for line in row_error_lines(result.rejects)), file=sys.stderr)
    write_mix_outputs(result, args.out, args.rejects, args.summary)
    print(format_summary(result))
    print(f"wrote {len(result.rows)} rows to {args.out}")
    if args.rejects:
        print(f"wrote {len(result.rejects)} rejected rows to {args.rejects}")
    return 0
