"""Corpus statistics and evaluation metrics for iterated self-distillation.

Two questions come up between rounds: has the new corpus collapsed onto a few templates
(`sd-plugin stats`, `corpus_stats`), and does the trained model still tell good scenarios from bad ones
(`sd-plugin eval-stats`, `evaluation_metrics`). The validation helpers here are shared with
`sd_plugin.mixer`; near-duplicate detection is `sd_plugin.dedup`, JSONL reading and writing `sd_plugin.files`.
"""

from __future__ import annotations

import io
import json
import math
import sys
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sd_plugin.cli import UsageError, argument_parser
from sd_plugin.dedup import NearDuplicates, near_duplicates, tokenize
from sd_plugin.files import (  # noqa: F401 (RowError and read_jsonl are imported from here by older code)
    RowError,
    read_jsonl,
    read_jsonl_rows,
    refuse_missing_field,
    refuse_output_over_input,
    refuse_row_errors,
    row_error_lines,
    write_bytes_atomic,
    write_text_atomic,
)

# Tried in order when no text field is named: generic corpora (text), SDPO / generation rows (prompt +
# completion), the project's SDFT records (prompt + demonstration), SD-Zero revisions (y_revised), chat traces.
TEXT_FIELD_CANDIDATES = ("text", "completion", "demonstration", "y_revised", "messages")
DEFAULT_GROUP_FIELD = "template_id"  # used when present; without it, groups are near-duplicate clusters


# ----------------------------------------------------------------------------------------- reading rows
def reward_error(row: dict, reward_field: str) -> str | None:
    """Why `row[reward_field]` is not a usable reward, or None when it is a finite number (booleans are refused)."""
    if reward_field not in row:
        return f"missing reward field {reward_field!r}"
    value = row[reward_field]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return f"non-numeric reward {value!r} in field {reward_field!r}"
    if not math.isfinite(value):
        return f"non-finite reward {value!r} in field {reward_field!r}"
    return None


def group_label(value) -> str:
    """Group key of a field value: strings as they are, anything else as compact JSON (so 5 and "5" match)."""
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True)


def row_text(row: dict, text_field: str | None = None) -> str | None:
    """The text of a row: `text_field`, else the first of TEXT_FIELD_CANDIDATES; chat messages are joined and
    an assistant message (a demonstration) is its content."""
    for field in (text_field,) if text_field else TEXT_FIELD_CANDIDATES:
        if field in row:
            value = row[field]
            break
    else:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, list) and all(isinstance(message, dict) for message in value):
        return "\n".join(str(message.get("content") or "") for message in value)
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return json.dumps(value, sort_keys=True, ensure_ascii=False)


# ------------------------------------------------------------------------------------ corpus statistics
def row_groups(rows: list[dict], group_field: str | None, structure: NearDuplicates) -> tuple[list[str], str]:
    """Group label per row and where it comes from: the group field, or, when `group_field` is None and no row
    has DEFAULT_GROUP_FIELD, the near-duplicate clusters of the rows' texts (`structure`). A named field that no
    row has raises UsageError. Rows missing a field that others have are the group "null"."""
    field = group_field or DEFAULT_GROUP_FIELD
    if any(field in row for row in rows):
        return [group_label(row.get(field)) for row in rows], f"field {field!r}"
    if group_field is not None:
        refuse_missing_field(rows, group_field, "group_field", f"{len(rows)} rows")
    clusters = structure.clusters()
    return [f"cluster-{cluster}" for cluster in clusters], f"near-duplicate clusters (Jaccard >= {structure.threshold})"


def corpus_stats(
    rows: list[dict],
    name: str = "corpus",
    group_field: str | None = None,
    reward_field: str = "reward",
    text_field: str | None = None,
    catalog_size: int | None = None,
    dedup_threshold: float = 0.8,
    groups: list[str] | None = None,
    near_duplicate_flags: list[bool] | None = None,
) -> dict:
    """Statistics of one corpus as a JSON-ready dict.

    Groups come from `group_field`, by default template_id when rows have it, else near-duplicate clusters.
    Reward mean/std (population std) over rows with a numeric reward; unique groups, catalog coverage,
    group entropy in nats, effective number of groups exp(entropy), share of the 10 largest groups;
    distinct-1/2 (distinct n-grams / all n-grams over the corpus) and near-duplicate rate (share of rows
    with text that have another row at word-3-gram Jaccard >= dedup_threshold). `groups` and
    `near_duplicate_flags` (one per row) replace the computed ones: the mixer derives them once for the union.
    """
    rewards = np.array([row[reward_field] for row in rows if reward_error(row, reward_field) is None], dtype=float)
    texts = [row_text(row, text_field) for row in rows]
    group_source = "given"
    if groups is None or near_duplicate_flags is None:
        structure = near_duplicates(texts, dedup_threshold)
        if groups is None:
            groups, group_source = row_groups(rows, group_field, structure)
        if near_duplicate_flags is None:
            near_duplicate_flags = structure.has_near_duplicate()
    ranked = Counter(groups).most_common()
    counts = np.array([count for _, count in ranked], dtype=float)
    shares = counts / counts.sum() if len(counts) else counts
    entropy = abs(float((shares * np.log(shares)).sum())) if len(counts) else None
    token_lists = [tokenize(text) for text in texts if text is not None]
    distinct = {}
    for n in (1, 2):
        ngrams = [tuple(tokens[i : i + n]) for tokens in token_lists for i in range(len(tokens) - n + 1)]
        distinct[n] = len(set(ngrams)) / len(ngrams) if ngrams else None
    flags = [flag for flag, text in zip(near_duplicate_flags, texts) if text is not None]  # rate over rows with text
    return {
        "name": name,
        "n": len(rows),
        "n_reward": len(rewards),
        "reward_mean": float(rewards.mean()) if len(rewards) else None,
        "reward_std": float(rewards.std()) if len(rewards) else None,
        "group_source": group_source,
        "unique_groups": len(ranked),
        "catalog_size": catalog_size,
        "coverage": len(ranked) / catalog_size if catalog_size else None,
        "group_entropy": entropy,
        "effective_groups": math.exp(entropy) if entropy is not None else None,
        "top10_share": float(shares[:10].sum()) if len(counts) else None,
        "distinct_1": distinct[1],
        "distinct_2": distinct[2],
        "near_dup_rate": sum(flags) / len(flags) if flags else None,
        "near_dup_threshold": dedup_threshold,
        "top_groups": [[group, count] for group, count in ranked[:10]],
        "group_counts": [count for _, count in ranked],
    }


CORPUS_TABLE_ROWS = [
    ("n", "rows"),
    ("reward_mean", "mean reward"),
    ("reward_std", "reward std"),
    ("unique_groups", "unique groups"),
    ("coverage", "catalog coverage"),
    ("group_entropy", "group entropy (nats)"),
    ("effective_groups", "effective groups"),
    ("top10_share", "top-10 group share"),
    ("distinct_1", "distinct-1"),
    ("distinct_2", "distinct-2"),
    ("near_dup_rate", "near-duplicate rate"),
]


def format_value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)


def format_table(columns: list[tuple[str, dict]], metric_rows: list[tuple[str, str]]) -> str:
    """Metrics as rows, one column per corpus or stage; values already strings are printed as they are."""
    header = ["metric"] + [name for name, _ in columns]
    body = [[label] + [values[key] if isinstance(values.get(key), str) else format_value(values.get(key))
                       for _, values in columns] for key, label in metric_rows]
    widths = [max(len(line[i]) for line in [header] + body) for i in range(len(header))]
    lines = [[cell.ljust(widths[i]) if i == 0 else cell.rjust(widths[i]) for i, cell in enumerate(line)]
             for line in [header] + body]
    rule = "-" * (sum(widths) + 2 * (len(widths) - 1))
    return "\n".join(["  ".join(lines[0]), rule] + ["  ".join(line) for line in lines[1:]])


def check_plot_output(out_path: str | Path) -> None:
    """Raise `UsageError` unless matplotlib is installed and can write `out_path`'s format: checked before
    anything is computed or written (--json included)."""
    try:
        from matplotlib.backend_bases import FigureCanvasBase
    except ImportError:
        raise UsageError(f"--plot {out_path} needs matplotlib: pip install matplotlib") from None
    image_format = Path(out_path).suffix.lstrip(".").lower() or "png"
    formats = FigureCanvasBase.get_supported_filetypes()
    if image_format not in formats:
        raise UsageError(f"--plot {out_path}: matplotlib cannot write .{image_format} (use one of {', '.join(sorted(formats))})")


def plot_group_distributions(all_stats: list[dict], out_path: str | Path) -> None:
    """Rank/frequency plot of the group distribution, one panel per corpus side by side (log y axis)."""
    from matplotlib.figure import Figure  # lazy: only the plot needs matplotlib; Figure renders with Agg

    figure = Figure(figsize=(4.5 * len(all_stats), 3.6))
    axes = figure.subplots(1, len(all_stats), sharey=True, squeeze=False)[0]
    for axis, stats in zip(axes, all_stats):
        counts = stats["group_counts"]
        axis.bar(np.arange(1, len(counts) + 1), counts, width=1.0, color="tab:blue")
        axis.set_yscale("log")
        axis.set_xlim(0, max(stats["catalog_size"] or 0, len(counts)) + 1)
        covered = f"{stats['unique_groups']}" + (f"/{stats['catalog_size']}" if stats["catalog_size"] else "")
        effective = stats["effective_groups"] or 0.0
        axis.set_title(f"{stats['name']}\n{covered} groups, effective {effective:.1f}", fontsize=9)
        axis.set_xlabel("group rank")
    axes[0].set_ylabel("rows per group")
    figure.tight_layout()
    image = io.BytesIO()
    figure.savefig(image, format=Path(out_path).suffix.lstrip(".").lower() or "png", dpi=110)
    write_bytes_atomic(out_path, image.getvalue())


def write_json(path: str | Path, payload) -> None:
    write_text_atomic(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def stats_main(argv: list[str] | None = None) -> int:
    """`sd-plugin stats CORPUS.jsonl [MORE.jsonl ...]`: print a side-by-side table, optional JSON and plot."""
    parser = argument_parser("stats", "Corpus statistics, one column per JSONL corpus.")
    parser.add_argument("corpora", nargs="+", help="JSONL corpora")
    parser.add_argument("--group-field", default=None,
                        help=f"field naming each row's group (default: {DEFAULT_GROUP_FIELD} when rows have it, else "
                             "near-duplicate clusters of the texts)")
    parser.add_argument("--reward-field", default=None, help="numeric reward field (default: reward, if rows have it)")
    parser.add_argument("--text-field", default=None,
                        help=f"text field (default: first of {', '.join(TEXT_FIELD_CANDIDATES)})")
    parser.add_argument("--catalog-size", type=int, default=None, help="number of possible groups (templates)")
    parser.add_argument("--dedup-threshold", type=float, default=0.8, help="word-3-gram Jaccard for near duplicates")
    parser.add_argument("--json", dest="json_out", default=None, help="write the statistics as JSON")
    parser.add_argument("--plot", default=None, help="write a rank/frequency PNG of the group distributions")
    parser.add_argument("--force", action="store_true", help="allow --json / --plot to overwrite an input file")
    args = parser.parse_args(argv)
    if not 0.0 < args.dedup_threshold <= 1.0:
        parser.error(f"--dedup-threshold must be in (0, 1], got {args.dedup_threshold}")
    refuse_output_over_input({"--json": args.json_out, "--plot": args.plot}, args.corpora, args.force)
    if args.plot:
        check_plot_output(args.plot)

    all_stats = []
    for path in args.corpora:
        rows = [row for _, row in read_jsonl_rows(path)]
        named = {"--group-field": args.group_field, "--text-field": args.text_field, "--reward-field": args.reward_field}
        for option, field in named.items():
            if field is not None:
                refuse_missing_field(rows, field, option, path)
        stats = corpus_stats(rows, Path(path).name, args.group_field, args.reward_field or "reward",
                             args.text_field, args.catalog_size, args.dedup_threshold)
        stats["n_invalid"] = 0  # malformed lines are refused above; kept for readers of older JSON
        all_stats.append(stats)
    print(format_table([(stats["name"], stats) for stats in all_stats], CORPUS_TABLE_ROWS))
    print("groups from: " + "; ".join(f"{stats['name']}: {stats['group_source']}" for stats in all_stats))
    if args.json_out:
        write_json(args.json_out, {"corpora": all_stats})
    if args.plot:
        plot_group_distributions(all_stats, args.plot)
    return 0


# ----------------------------------------------------------------------------------- evaluation metrics
@dataclass
class Scenario:
    """The scored generations of one scenario for one model stage."""

    scenario_id: str
    label: int | None  # 1 = good scenario, 0 = bad, None = unlabelled (no good/bad means, no AUC)
    rewards: list[float]
    passes: dict[str, list[bool]]  # component pass flags per --pass-field


def parse_label(value) -> int | None:
    """good/bad, 1/0, true/false (any case) -> 1/0; anything else -> None."""
    if isinstance(value, bool) or value in (0, 1):
        return int(value)
    return {"good": 1, "bad": 0, "1": 1, "0": 0, "true": 1, "false": 0}.get(str(value).strip().lower())


def average_ranks(values: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(values, kind="mergesort")
    _, first, counts = np.unique(values[order], return_index=True, return_counts=True)
    ranks = np.empty(len(values))
    ranks[order] = np.repeat(first + (counts + 1) / 2.0, counts)
    return ranks


def auc_mann_whitney(good_scores, bad_scores) -> float | None:
    """P(good score > bad score) + 0.5 P(tie) over all good/bad pairs (Mann-Whitney U / (n_good n_bad))."""
    good, bad = np.asarray(good_scores, dtype=float), np.asarray(bad_scores, dtype=float)
    if not len(good) or not len(bad):
        return None
    ranks = average_ranks(np.concatenate([good, bad]))
    return float((ranks[: len(good)].sum() - len(good) * (len(good) + 1) / 2) / (len(good) * len(bad)))


def evaluation_metrics(scenarios: list[Scenario], pass_fields: list[str] = (), auc_level: str = "scenario") -> dict:
    """Mean reward over all generations and over those of good / bad scenarios, pass rate per component,
    and the AUC of reward separating good from bad scenarios (per-scenario mean reward, or every generation)."""
    def mean(values):
        return float(np.mean(values)) if len(values) else None

    good = [s for s in scenarios if s.label == 1]
    bad = [s for s in scenarios if s.label == 0]
    metrics = {
        "mean_R": mean([r for s in scenarios for r in s.rewards]),
        "good_mean": mean([r for s in good for r in s.rewards]),
        "bad_mean": mean([r for s in bad for r in s.rewards]),
    }
    for field in pass_fields:
        metrics[f"pass_rate:{field}"] = mean([p for s in scenarios for p in s.passes[field]])
    if auc_level == "scenario":
        metrics["auc"] = auc_mann_whitney([np.mean(s.rewards) for s in good], [np.mean(s.rewards) for s in bad])
    else:
        metrics["auc"] = auc_mann_whitney([r for s in good for r in s.rewards], [r for s in bad for r in s.rewards])
    return metrics


def bootstrap_intervals(scenarios: list[Scenario], pass_fields, auc_level: str, samples: int, seed: int,
                        level: float = 0.95) -> dict:
    """Percentile intervals per metric from `samples` resamples of scenarios with replacement, stratified by
    label so every resample keeps the numbers of good and bad scenarios (and the AUC stays defined)."""
    rng = np.random.default_rng(seed)
    strata = [[s for s in scenarios if s.label == label] for label in (1, 0, None)]
    draws = defaultdict(list)
    for _ in range(samples):
        resample = [stratum[i] for stratum in strata if stratum for i in rng.integers(0, len(stratum), len(stratum))]
        for key, value in evaluation_metrics(resample, pass_fields, auc_level).items():
            if value is not None:
                draws[key].append(value)
    tail = (1.0 - level) / 2 * 100
    return {key: [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]
            for key, values in draws.items()}


def field_value(row: dict, name: str):
    """A row's value of `name`; `provenance.KEY` reads the `provenance` object `sd-plugin generate` writes."""
    if name.startswith("provenance."):
        provenance = row.get("provenance")
        return provenance.get(name.split(".", 1)[1]) if isinstance(provenance, dict) else None
    return row.get(name)


@dataclass
class ScoredFields:
    """Where eval-stats finds each value in a row (`--scenario-field`, `--label-field`, `--stage-field`,
    `--reward-field`). None: the defaults, which also read `sd-plugin generate`'s rows as they are:
    scenario_id, else generate's prompt_id; label (no row has one: unlabelled); stage, else generate's round,
    else the file name."""

    scenario: str | None = None
    label: str | None = None
    stage: str | None = None
    reward: str = "reward"


def load_scored_rows(paths: list[str], stage_names: list[str] | None, pass_fields: list[str],
                     fields: ScoredFields | None = None):
    """Scenarios per stage (in order of first appearance) and the RowErrors of unusable rows."""
    fields = fields or ScoredFields()
    stages: dict[str, dict[str, Scenario]] = {}
    errors = []
    files = [read_jsonl(path) for path in paths]
    # Unlabelled when no label field is named and no row has `label` (generate's rows): means and pass rates only.
    labelled = fields.label is not None or any("label" in row for numbered, _ in files for _, row in numbered)
    label_field = fields.label or "label"
    for file_index, (path, (numbered_rows, file_errors)) in enumerate(zip(paths, files)):
        errors.extend(file_errors)
        for line, row in numbered_rows:
            problems = [message for message in [reward_error(row, fields.reward)] if message]
            label = parse_label(field_value(row, label_field)) if labelled else None
            if labelled and label is None:
                problems.append(f"{label_field} {field_value(row, label_field)!r} is not good/bad/1/0")
            scenario_field = fields.scenario or ("scenario_id" if "scenario_id" in row or "prompt_id" not in row else "prompt_id")
            if field_value(row, scenario_field) is None:
                problems.append(f"missing {scenario_field} (--scenario-field names the scenario id)")
            problems += [f"missing pass field {field!r}" for field in pass_fields if field not in row]
            if problems:
                errors.append(RowError(path, line, "; ".join(problems)))
                continue
            if stage_names:
                stage = stage_names[file_index]
            elif fields.stage is not None:
                stage = str(field_value(row, fields.stage))
            else:
                stage = str(row.get("stage") or row.get("round") or Path(path).stem)
            scenario_id = group_label(field_value(row, scenario_field))
            scenario = stages.setdefault(stage, {}).setdefault(
                scenario_id, Scenario(scenario_id, label, [], {field: [] for field in pass_fields}))
            if scenario.label != label:
                errors.append(RowError(path, line, f"scenario {scenario_id!r} labelled both good and bad"))
                continue
            scenario.rewards.append(float(field_value(row, fields.reward)))
            for field in pass_fields:
                scenario.passes[field].append(bool(row[field]))
    return stages, errors


def eval_stats_main(argv: list[str] | None = None) -> int:
    """`sd-plugin eval-stats SCORED.jsonl [...]`: per-stage reward, pass-rate and AUC table with bootstrap CIs."""
    parser = argument_parser("eval-stats", "Evaluation metrics per model stage.")
    parser.add_argument("scored", nargs="+", help="JSONL rows: stage, scenario_id, label, reward[, pass flags]; "
                                                  "`sd-plugin generate --verifier` output is read as it is")
    parser.add_argument("--stage-names", default=None,
                        help="comma-separated stage name per file (one file per stage; default: the rows' stage "
                             "field, else the file name)")
    parser.add_argument("--pass-field", action="append", default=[], help="boolean component pass flag (repeatable)")
    parser.add_argument("--scenario-field", default=None,
                        help="field with the scenario id (default: scenario_id, else generate's prompt_id); "
                             "provenance.KEY reads generate's provenance, e.g. provenance.group_id")
    parser.add_argument("--label-field", default=None,
                        help="field with the good/bad label (default: label; when no row has one, the table has no "
                             "good/bad means and no AUC)")
    parser.add_argument("--stage-field", default=None,
                        help="field with the model stage (default: stage, else generate's round, else the file name)")
    parser.add_argument("--reward-field", default="reward", help="numeric reward field")
    parser.add_argument("--auc-level", choices=["scenario", "generation"], default="scenario",
                        help="AUC over per-scenario mean rewards or over every generation")
    parser.add_argument("--bootstrap", type=int, default=1000, help="resamples of scenarios for CIs (0: none)")
    parser.add_argument("--seed", type=int, default=0, help="bootstrap seed")
    parser.add_argument("--json", dest="json_out", default=None, help="write the metrics as JSON")
    parser.add_argument("--force", action="store_true", help="allow --json to overwrite an input file")
    args = parser.parse_args(argv)
    refuse_output_over_input({"--json": args.json_out}, args.scored, args.force)

    stage_names = args.stage_names.split(",") if args.stage_names else None
    if stage_names and len(stage_names) != len(args.scored):
        raise UsageError(f"{len(stage_names)} --stage-names for {len(args.scored)} files")
    fields = ScoredFields(args.scenario_field, args.label_field, args.stage_field, args.reward_field)
    stages, errors = load_scored_rows(args.scored, stage_names, args.pass_field, fields)
    if len(errors) > 1:
        print("\n".join(f"  {line}" for line in row_error_lines(errors)), file=sys.stderr)
    refuse_row_errors(errors, "invalid")
    results = {}
    for stage, by_id in stages.items():
        scenarios = list(by_id.values())
        metrics = evaluation_metrics(scenarios, args.pass_field, args.auc_level)
        results[stage] = {
            "n_generations": sum(len(s.rewards) for s in scenarios),
            "n_good": sum(s.label == 1 for s in scenarios),
            "n_bad": sum(s.label == 0 for s in scenarios),
            **metrics,
            "ci": bootstrap_intervals(scenarios, args.pass_field, args.auc_level, args.bootstrap, args.seed)
            if args.bootstrap else {},
        }
    metric_keys = ["mean_R", "good_mean", "bad_mean"] + [f"pass_rate:{f}" for f in args.pass_field] + ["auc"]
    columns = []
    for stage, result in results.items():
        cells = {key: result[key] for key in ("n_generations", "n_good", "n_bad")}
        for key in metric_keys:
            interval = result["ci"].get(key)
            cells[key] = format_value(result[key]) + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")
        columns.append((stage, cells))
    labels = {"mean_R": "mean R", "good_mean": "mean R (good)", "bad_mean": "mean R (bad)",
              "auc": f"AUC ({args.auc_level})"}
    rows = [("n_generations", "generations"), ("n_good", "good scenarios"), ("n_bad", "bad scenarios")]
    labels.update({f"pass_rate:{field}": f"{field} pass rate" for field in args.pass_field})
    print(format_table(columns, rows + [(key, labels[key]) for key in metric_keys]))
    if all(s.label is None for by_id in stages.values() for s in by_id.values()):
        print("no row has a label: good/bad means and the AUC need --label-field (a good/bad/1/0 field)")
    if args.bootstrap:
        print(f"[lo, hi]: 95% bootstrap interval, {args.bootstrap} resamples of scenarios (stratified by label), "
              f"seed {args.seed}")
    if args.json_out:
        settings = {"auc_level": args.auc_level, "bootstrap": args.bootstrap, "seed": args.seed,
                    "pass_fields": args.pass_field}
        write_json(args.json_out, {"stages": results, "settings": settings})
    return 0
