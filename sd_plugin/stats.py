"""Corpus statistics and evaluation metrics for iterated self-distillation.

Two questions come up between rounds: has the new corpus collapsed onto a few templates
(`sd-plugin stats`, `corpus_stats`), and does the trained model still tell good scenarios from bad ones
(`sd-plugin eval-stats`, `evaluation_metrics`). The validation and near-duplicate helpers here are
shared with `sd_plugin.mixer`; JSONL reading and writing is `sd_plugin.files`.
"""

from __future__ import annotations

import io
import itertools
import json
import math
import re
import sys
import zlib
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from sd_plugin.cli import UsageError, argument_parser
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
TOKEN_PATTERN = re.compile(r"\w+|[^\w\s]")
EXACT_PAIRS_LIMIT = 200  # up to this many distinct texts every pair is compared; above, MinHash LSH
MINHASH_PERMUTATIONS = 128
MINHASH_PRIME = (1 << 32) - 5  # largest prime below 2^32: a*x + b with a, x, b < p fits in uint64
CHUNK_SHINGLES = 16_384  # shingles hashed per vectorised MinHash pass: 128 x 16,384 x 8 bytes = 16 MB
PROGRESS_FROM = 20_000  # distinct texts from which near-duplicate detection shows a progress bar


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


# ------------------------------------------------------------------------------------- near duplicates
def tokenize(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens."""
    return TOKEN_PATTERN.findall(text.lower())


def shingles(tokens: list[str], ngram: int = 3) -> frozenset:
    """Set of word n-grams; a text shorter than `ngram` tokens is a single shingle."""
    if len(tokens) < ngram:
        return frozenset([tuple(tokens)]) if tokens else frozenset()
    return frozenset(tuple(tokens[i : i + ngram]) for i in range(len(tokens) - ngram + 1))


def jaccard(a: frozenset, b: frozenset) -> float:
    """Jaccard similarity of two shingle sets; two empty texts are identical."""
    if not a and not b:
        return 1.0
    return len(a & b) / len(a | b)


def shingle_ids(shingle_set: frozenset) -> np.ndarray:
    """A shingle set as sorted unique 64-bit ids: CRC32 in the high half (the MinHash input), Adler-32 in the low
    half, so two different shingles share an id with negligible probability. About 8 bytes per shingle instead of
    a tuple of strings: 100k texts fit in tens of MB."""
    encoded = [" ".join(shingle).encode() for shingle in shingle_set]
    ids = np.fromiter(((zlib.crc32(text) << 32) | zlib.adler32(text) for text in encoded), np.uint64, len(encoded))
    return np.unique(ids)


def id_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """`jaccard` of two `shingle_ids` arrays."""
    if not len(a) and not len(b):
        return 1.0
    common = np.intersect1d(a, b, assume_unique=True).size
    return common / (len(a) + len(b) - common)


def minhash_signatures(id_sets: list[np.ndarray], num_perm: int = MINHASH_PERMUTATIONS, seed: int = 0,
                       progress=None) -> np.ndarray:
    """MinHash signature per `shingle_ids` array, shape (len(id_sets), num_perm), with h(x) = (a*x + b) mod p.

    x is the shingle's CRC32 (stable across processes, unlike `hash`); p = 2^32 - 5 keeps a*x + b exact in uint64.
    Texts are hashed in chunks of about CHUNK_SHINGLES shingles (one vectorised pass per chunk).
    """
    rng = np.random.default_rng(seed)
    a = rng.integers(1, MINHASH_PRIME, size=num_perm, dtype=np.uint64)
    b = rng.integers(0, MINHASH_PRIME, size=num_perm, dtype=np.uint64)
    signatures = np.full((len(id_sets), num_perm), MINHASH_PRIME, dtype=np.uint32)  # every value is < p < 2^32
    start = 0
    while start < len(id_sets):
        end, total = start, 0
        while end < len(id_sets) and (total == 0 or total + len(id_sets[end]) <= CHUNK_SHINGLES):
            total += len(id_sets[end])
            end += 1
        chunk = [ids for ids in id_sets[start:end]]
        nonempty = [index for index, ids in enumerate(chunk) if len(ids)]
        if nonempty:
            hashes = np.concatenate([chunk[index] >> np.uint64(32) for index in nonempty]) % np.uint64(MINHASH_PRIME)
            values = (np.outer(a, hashes) + b[:, None]) % np.uint64(MINHASH_PRIME)
            offsets = np.cumsum([0] + [len(chunk[index]) for index in nonempty[:-1]])
            signatures[start + np.array(nonempty)] = np.minimum.reduceat(values, offsets, axis=1).T
        if progress is not None:
            progress.update(end - start)
        start = end
    return signatures


def lsh_rows_per_band(threshold: float, num_perm: int = MINHASH_PERMUTATIONS) -> int:
    """Rows per LSH band: the largest (fewest candidates) that still finds a pair at `threshold` with p >= 0.99."""
    for rows in (16, 8, 4, 2):
        if 1.0 - (1.0 - threshold**rows) ** (num_perm // rows) >= 0.99:
            return rows
    return 1


class NearDuplicates:
    """Near-duplicate structure of a list of texts: identical texts share one `text_id`; two distinct texts are
    near duplicates when they share an LSH bucket (candidates) and their word n-gram Jaccard is >= threshold.

    Nothing enumerates all pairs of a bucket: each question (does a row have a near duplicate, which cluster is
    it in, is it a duplicate of a row kept before it) stops at the first similar bucket-mate, or compares against
    one member list per cluster or the rows kept so far. On a collapsed corpus (thousands of near-identical
    texts in one bucket) that is a few comparisons per text, so the cost stays near linear; the answers are
    those of checking every candidate pair.
    """

    def __init__(self, text_id: list[int], id_sets: list[np.ndarray], bucket_of: np.ndarray, threshold: float):
        self.text_id = text_id  # per row: index of its distinct text (-1 for a row without text)
        self.id_sets = id_sets  # per distinct text: its shingle ids
        self.bucket_of = bucket_of  # (distinct texts, bands): global bucket number, -1 where the text is alone
        self.threshold = threshold
        shared = bucket_of[bucket_of >= 0]
        self.bucket_members_order = np.argsort(bucket_of.ravel(), kind="stable")[len(bucket_of.ravel()) - len(shared):]
        self.bucket_members_order //= max(1, bucket_of.shape[1])  # flat index -> text id
        counts = np.bincount(shared, minlength=int(shared.max()) + 1 if len(shared) else 0)
        self.bucket_starts = np.concatenate([[0], np.cumsum(counts)])

    def similar(self, first: int, second: int) -> bool:
        return id_jaccard(self.id_sets[first], self.id_sets[second]) >= self.threshold

    def buckets(self, tid: int) -> list[int]:
        """The shared buckets of distinct text `tid` (one per band where it has company)."""
        return [int(bucket) for bucket in self.bucket_of[tid] if bucket >= 0]

    def members(self, bucket: int) -> np.ndarray:
        return self.bucket_members_order[self.bucket_starts[bucket] : self.bucket_starts[bucket + 1]]

    def has_similar(self, tid: int, accept) -> bool:
        """Whether a bucket-mate `other` of `tid` with `accept(other)` is similar to it (stops at the first)."""
        checked = {tid}
        for bucket in self.buckets(tid):
            for other in self.members(bucket):
                other = int(other)
                if other not in checked:
                    checked.add(other)
                    if accept(other) and self.similar(tid, other):
                        return True
        return False

    def has_near_duplicate(self, subset: list[int] | None = None) -> list[bool]:
        """Per row of `subset` (row indices; default all rows): does another row of the subset have the same
        text or a similar one."""
        text_ids = self.text_id if subset is None else [self.text_id[row] for row in subset]
        present = Counter(text_ids)
        flags = {tid: present[tid] > 1 or self.has_similar(tid, present.__contains__) for tid in present if tid >= 0}
        return [tid >= 0 and flags[tid] for tid in text_ids]

    def clusters(self) -> list[int]:
        """Per row: connected component of the similarity graph (rows without text are their own cluster).

        Union-find over bucket members: a text joins a cluster already met in the bucket when it is similar to one
        of that cluster's members there, which links every similar pair of the bucket without listing all pairs.
        """
        parent = list(range(len(self.id_sets)))

        def root(node: int) -> int:
            while parent[node] != node:
                parent[node] = parent[parent[node]]
                node = parent[node]
            return node

        for bucket in range(len(self.bucket_starts) - 1):
            groups: dict[int, list[int]] = {}  # key -> the bucket's members met so far in one cluster
            for member in self.members(bucket):
                member, home = int(member), None
                for key in list(groups):
                    seen = groups[key]
                    if root(seen[0]) != root(member):
                        if not any(self.similar(member, other) for other in seen):
                            continue
                        parent[root(member)] = root(seen[0])
                    if home is None:
                        home = key
                    else:  # two clusters of this bucket became one: merge their lists, smaller into larger
                        if len(groups[home]) < len(seen):
                            groups[home], groups[key] = seen, groups[home]
                        groups[home].extend(groups.pop(key))
                if home is None:
                    groups[member] = [member]
                else:
                    groups[home].append(member)
        lonely = itertools.count(len(parent))
        return [root(tid) if tid >= 0 else next(lonely) for tid in self.text_id]

    def keep_first(self, rows: list[int]) -> list[int]:
        """The rows of `rows` (in priority order) that do not repeat or resemble the text of a row kept before
        them; rows without text are always kept. Compares each row only with kept texts in its buckets."""
        kept, kept_texts = [], set()
        kept_in_bucket: dict[int, list[int]] = defaultdict(list)
        for row in rows:
            tid = self.text_id[row]
            if tid >= 0:
                if tid in kept_texts:
                    continue
                buckets = self.buckets(tid)
                checked = set()
                duplicate = False
                for bucket in buckets:
                    for other in kept_in_bucket.get(bucket, ()):
                        if other not in checked:
                            checked.add(other)
                            if self.similar(tid, other):
                                duplicate = True
                                break
                    if duplicate:
                        break
                if duplicate:
                    continue
                kept_texts.add(tid)
                for bucket in buckets:
                    kept_in_bucket[bucket].append(tid)
            kept.append(row)
        return kept

    @property
    def neighbors(self) -> list[set[int]]:
        """Per distinct text: every other text with Jaccard >= threshold among its candidates. Lists all pairs
        of every bucket (quadratic on a collapsed corpus): for inspection and tests, not used by the commands."""
        found = [set() for _ in self.id_sets]
        for bucket in range(len(self.bucket_starts) - 1):
            for first, second in itertools.combinations(self.members(bucket).tolist(), 2):
                if second not in found[first] and self.similar(first, second):
                    found[first].add(second)
                    found[second].add(first)
        return found


def near_duplicates(texts: list[str | None], threshold: float = 0.8, ngram: int = 3, progress: bool | None = None
                    ) -> NearDuplicates:
    """Find the texts whose word n-gram Jaccard similarity is >= `threshold` (see `NearDuplicates`).

    Up to EXACT_PAIRS_LIMIT distinct texts every pair is a candidate (one bucket holds them all); above that,
    MinHash LSH buckets propose the candidates and each is checked with the exact Jaccard, so there are no false
    positives and (by the banding choice) at most ~1% missed pairs right at the threshold. Rows whose text is
    None are never duplicates. `progress`: a progress bar over the texts (None: only from PROGRESS_FROM texts).
    """
    distinct: dict[str, int] = {}
    text_id = [-1 if text is None else distinct.setdefault(text, len(distinct)) for text in texts]
    show = len(distinct) >= PROGRESS_FROM if progress is None else progress
    bar = tqdm(total=2 * len(distinct), desc="near duplicates", unit="text", disable=not show)
    id_sets = []
    for text in distinct:
        id_sets.append(shingle_ids(shingles(tokenize(text), ngram)))
        if len(id_sets) % 1000 == 0:
            bar.update(1000)
    bar.update(len(id_sets) % 1000)
    if len(id_sets) <= EXACT_PAIRS_LIMIT:
        bucket_of = np.zeros((len(id_sets), 1), dtype=np.int64) if len(id_sets) > 1 else np.full((len(id_sets), 1), -1)
        bar.update(len(id_sets))
    else:
        signatures = minhash_signatures(id_sets, progress=bar)
        rows_per_band = lsh_rows_per_band(threshold)
        bands = signatures.shape[1] // rows_per_band
        bucket_of = np.full((len(id_sets), bands), -1, dtype=np.int32 if len(id_sets) * bands < 2**31 else np.int64)
        next_bucket = 0
        for band in range(bands):
            keys = np.ascontiguousarray(signatures[:, band * rows_per_band : (band + 1) * rows_per_band])
            _, inverse, counts = np.unique(keys.view(f"V{keys.itemsize * rows_per_band}").ravel(),
                                           return_inverse=True, return_counts=True)
            shared = counts[inverse] > 1
            # renumber this band's shared buckets after the previous bands'
            numbers = np.cumsum(counts > 1) - 1 + next_bucket
            bucket_of[shared, band] = numbers[inverse[shared]]
            next_bucket += int((counts > 1).sum())
    bar.close()
    return NearDuplicates(text_id, id_sets, bucket_of, threshold)


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
    refuse_output_over_input({"--json": args.json_out, "--plot": args.plot}, args.corpora, args.force)

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
    label: int  # 1 = good scenario, 0 = bad
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
    strata = [[s for s in scenarios if s.label == label] for label in (1, 0)]
    draws = defaultdict(list)
    for _ in range(samples):
        resample = [stratum[i] for stratum in strata if stratum for i in rng.integers(0, len(stratum), len(stratum))]
        for key, value in evaluation_metrics(resample, pass_fields, auc_level).items():
            if value is not None:
                draws[key].append(value)
    tail = (1.0 - level) / 2 * 100
    return {key: [float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))]
            for key, values in draws.items()}


def load_scored_rows(paths: list[str], stage_names: list[str] | None, pass_fields: list[str]):
    """Scenarios per stage (in order of first appearance) and the RowErrors of unusable rows."""
    stages: dict[str, dict[str, Scenario]] = {}
    errors = []
    for file_index, path in enumerate(paths):
        numbered_rows, file_errors = read_jsonl(path)
        errors.extend(file_errors)
        for line, row in numbered_rows:
            problems = [message for message in [reward_error(row, "reward")] if message]
            label = parse_label(row.get("label"))
            if label is None:
                problems.append(f"label {row.get('label')!r} is not good/bad/1/0")
            if "scenario_id" not in row:
                problems.append("missing scenario_id")
            problems += [f"missing pass field {field!r}" for field in pass_fields if field not in row]
            if problems:
                errors.append(RowError(path, line, "; ".join(problems)))
                continue
            stage = stage_names[file_index] if stage_names else str(row.get("stage", Path(path).stem))
            scenario_id = group_label(row["scenario_id"])
            scenario = stages.setdefault(stage, {}).setdefault(
                scenario_id, Scenario(scenario_id, label, [], {field: [] for field in pass_fields}))
            if scenario.label != label:
                errors.append(RowError(path, line, f"scenario {scenario_id!r} labelled both good and bad"))
                continue
            scenario.rewards.append(float(row["reward"]))
            for field in pass_fields:
                scenario.passes[field].append(bool(row[field]))
    return stages, errors


def eval_stats_main(argv: list[str] | None = None) -> int:
    """`sd-plugin eval-stats SCORED.jsonl [...]`: per-stage reward, pass-rate and AUC table with bootstrap CIs."""
    parser = argument_parser("eval-stats", "Evaluation metrics per model stage.")
    parser.add_argument("scored", nargs="+", help="JSONL rows: stage, scenario_id, label, reward[, pass flags]")
    parser.add_argument("--stage-names", default=None,
                        help="comma-separated stage name per file (one file per stage; default: the rows' stage "
                             "field, else the file name)")
    parser.add_argument("--pass-field", action="append", default=[], help="boolean component pass flag (repeatable)")
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
    stages, errors = load_scored_rows(args.scored, stage_names, args.pass_field)
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
    if args.bootstrap:
        print(f"[lo, hi]: 95% bootstrap interval, {args.bootstrap} resamples of scenarios (stratified by label), "
              f"seed {args.seed}")
    if args.json_out:
        settings = {"auc_level": args.auc_level, "bootstrap": args.bootstrap, "seed": args.seed,
                    "pass_fields": args.pass_field}
        write_json(args.json_out, {"stages": results, "settings": settings})
    return 0
