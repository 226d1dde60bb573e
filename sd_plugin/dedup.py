"""Near-duplicate detection of texts: word 3-gram shingles compared by Jaccard similarity.

Candidates come from an exact similarity join (prefix filtering with length and positional filters, as in
AllPairs / PPJoin): shingles are ordered rarest first over the whole corpus, and two texts with Jaccard >= t must
share one of the first |A| - ceil(t|A|) + 1 shingles of each, at positions where enough shingles remain to reach
the overlap t/(1+t)(|A|+|B|). Candidates are grouped by (shingle, text length, position), so a group that cannot
reach the overlap is skipped whole: on a corpus of one template with a changing number (every pair below the
threshold, every pair sharing most shingles) a text meets no candidate at all, and on a collapsed corpus (every
pair above) the first candidate answers. Every answer is exact (the all-pairs definition), with no missed pairs.

`near_duplicates(texts, threshold)` returns `NearDuplicates`: `has_near_duplicate()`, `clusters()` and
`keep_first(rows)` (the mixer's dedup). Used by `sd-plugin stats` and `sd-plugin mix`; benchmarks/bench_dedup.py
measures it.
"""

from __future__ import annotations

import bisect
import itertools
import math
import re
import zlib
from collections import Counter, defaultdict

import numpy as np
from tqdm import tqdm

TOKEN_PATTERN = re.compile(r"\w+|[^\w\s]")
PROGRESS_FROM = 20_000  # distinct texts from which near-duplicate detection shows a progress bar
_SLACK = 1e-9  # bounds are loosened by this much, so float rounding can only add candidates, never drop one


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
    """A shingle set as sorted unique 64-bit ids (CRC32 in the high half, Adler-32 in the low half, so two
    different shingles share an id with negligible probability): about 8 bytes per shingle instead of a tuple of
    strings."""
    encoded = [" ".join(shingle).encode() for shingle in shingle_set]
    ids = np.fromiter(((zlib.crc32(text) << 32) | zlib.adler32(text) for text in encoded), np.uint64, len(encoded))
    return np.unique(ids)


def id_jaccard(a: np.ndarray, b: np.ndarray) -> float:
    """`jaccard` of two sorted arrays of unique shingle ids (or ranks)."""
    if not len(a) and not len(b):
        return 1.0
    common = np.intersect1d(a, b, assume_unique=True).size
    return common / (len(a) + len(b) - common)


def prefix_length(size: int, threshold: float) -> int:
    """How many of a text's rarest shingles a text with Jaccard >= threshold must share one of."""
    return size - math.ceil(threshold * size - _SLACK) + 1


def min_overlap(size_a: int, size_b: int, threshold: float) -> int:
    """The fewest shared shingles two texts of these sizes need for Jaccard >= threshold."""
    return math.ceil(threshold / (1 + threshold) * (size_a + size_b) - _SLACK)


class NearDuplicates:
    """Near-duplicate structure of a list of texts: identical texts share one `text_id`; two distinct texts are
    near duplicates when their word n-gram Jaccard is >= threshold.

    `id_sets[t]` are text t's shingles as ranks in the corpus order (rarest first), sorted. Text t is a member of
    the buckets (shingle, size, position) of its prefix shingles; `candidate_buckets(t)` are the buckets that can
    hold a text similar to t (length and positional filters passed). A similar pair always meets: the later text
    finds the earlier one in the bucket of their first shared shingle. Each question stops at the first similar
    candidate, or compares against one member list per cluster, or against the rows kept so far.
    """

    def __init__(self, text_id: list[int], id_sets: list[np.ndarray], threshold: float):
        self.text_id = text_id  # per row: index of its distinct text (-1 for a row without text)
        self.id_sets = id_sets
        self.threshold = threshold
        keys, self.member_buckets = {}, []
        for tid, ranks in enumerate(id_sets):
            size = len(ranks)
            prefix = ranks[: prefix_length(size, threshold)].tolist() if size else [-1]  # empty texts share one
            self.member_buckets.append([keys.setdefault((rank, size, position), len(keys))
                                        for position, rank in enumerate(prefix)])
        self.bucket_members: list[list[int]] = [[] for _ in keys]
        for tid, buckets in enumerate(self.member_buckets):
            for bucket in buckets:
                self.bucket_members[bucket].append(tid)
        self.groups_of: dict[int, list[tuple[int, int, int]]] = defaultdict(list)  # shingle -> (size, position, bucket)
        for (rank, size, position), bucket in sorted(keys.items()):
            self.groups_of[rank].append((size, position, bucket))
        self._candidates: dict[int, list[int]] = {}

    def similar(self, first: int, second: int) -> bool:
        return id_jaccard(self.id_sets[first], self.id_sets[second]) >= self.threshold

    def candidate_buckets(self, tid: int) -> list[int]:
        """The buckets whose members may be similar to distinct text `tid` (itself may be among them)."""
        if tid in self._candidates:
            return self._candidates[tid]
        size, threshold = len(self.id_sets[tid]), self.threshold
        if not size:
            found = list(self.member_buckets[tid])
        else:
            found = []
            low, high = math.ceil(threshold * size - _SLACK), math.floor(size / threshold + _SLACK)
            for position, rank in enumerate(self.id_sets[tid][: prefix_length(size, threshold)].tolist()):
                groups = self.groups_of[rank]
                start = bisect.bisect_left(groups, (low, -1, -1))
                for other_size, other_position, bucket in itertools.islice(groups, start, None):
                    if other_size > high:
                        break
                    remaining = min(size - position, other_size - other_position)  # the shingle itself included
                    if remaining >= min_overlap(size, other_size, threshold):
                        found.append(bucket)
        self._candidates[tid] = found
        return found

    def has_similar(self, tid: int, accept) -> bool:
        """Whether a candidate `other` of `tid` with `accept(other)` is similar to it (stops at the first)."""
        checked = {tid}
        for bucket in self.candidate_buckets(tid):
            for other in self.bucket_members[bucket]:
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

        Union-find over the texts in order: each bucket keeps the texts met so far grouped by cluster, and a text
        joins every cluster of its candidate buckets that holds a text similar to it, which links every similar
        pair without listing all pairs.
        """
        parent = list(range(len(self.id_sets)))

        def root(node: int) -> int:
            while parent[node] != node:
                parent[node] = parent[parent[node]]
                node = parent[node]
            return node

        met: dict[int, dict[int, list[int]]] = defaultdict(dict)  # bucket -> key -> its members met in one cluster
        for tid in range(len(self.id_sets)):
            for bucket in self.candidate_buckets(tid):
                groups = met.get(bucket)
                if not groups:
                    continue
                by_root: dict[int, int] = {}
                for key in list(groups):  # clusters merged since: their lists become one
                    home = by_root.setdefault(root(groups[key][0]), key)
                    if home != key:
                        groups[home].extend(groups.pop(key))
                for key, members in groups.items():
                    if root(members[0]) != root(tid) and any(self.similar(tid, other) for other in members):
                        parent[root(tid)] = root(members[0])
            for bucket in self.member_buckets[tid]:  # keyed by root: a key gone stale is merged when next probed
                met[bucket].setdefault(root(tid), []).append(tid)
        lonely = itertools.count(len(parent))
        return [root(tid) if tid >= 0 else next(lonely) for tid in self.text_id]

    def keep_first(self, rows: list[int]) -> list[int]:
        """The rows of `rows` (in priority order) that do not repeat or resemble the text of a row kept before
        them; rows without text are always kept. Compares each row only with kept texts in its candidate buckets."""
        kept, kept_texts = [], set()
        kept_in_bucket: dict[int, list[int]] = defaultdict(list)
        for row in rows:
            tid = self.text_id[row]
            if tid >= 0:
                if tid in kept_texts:
                    continue
                if any(self.similar(tid, other) for bucket in self.candidate_buckets(tid)
                       for other in kept_in_bucket.get(bucket, ())):
                    continue
                kept_texts.add(tid)
                for bucket in self.member_buckets[tid]:
                    kept_in_bucket[bucket].append(tid)
            kept.append(row)
        return kept

    @property
    def neighbors(self) -> list[set[int]]:
        """Per distinct text: every other text with Jaccard >= threshold. Lists every candidate pair (quadratic on
        a collapsed corpus): for inspection and tests, not used by the commands."""
        found = [set() for _ in self.id_sets]
        for tid in range(len(self.id_sets)):
            for bucket in self.candidate_buckets(tid):
                for other in self.bucket_members[bucket]:
                    if other != tid and other not in found[tid] and self.similar(tid, other):
                        found[tid].add(other)
                        found[other].add(tid)
        return found


def near_duplicates(texts: list[str | None], threshold: float = 0.8, ngram: int = 3, progress: bool | None = None
                    ) -> NearDuplicates:
    """Find the texts whose word n-gram Jaccard similarity is >= `threshold` (see `NearDuplicates`): exact, no
    false positives and no missed pairs. Rows whose text is None are never duplicates. `progress`: a progress bar
    over the texts (None: only from PROGRESS_FROM texts)."""
    if not 0.0 < threshold <= 1.0:
        raise ValueError(f"near-duplicate threshold must be in (0, 1], got {threshold}")
    distinct: dict[str, int] = {}
    text_id = [-1 if text is None else distinct.setdefault(text, len(distinct)) for text in texts]
    show = len(distinct) >= PROGRESS_FROM if progress is None else progress
    with tqdm(total=len(distinct), desc="near duplicates", unit="text", disable=not show) as bar:
        id_sets = []
        for text in distinct:
            id_sets.append(shingle_ids(shingles(tokenize(text), ngram)))
            if len(id_sets) % 1000 == 0:
                bar.update(1000)
        bar.update(len(id_sets) % 1000)
    # the corpus order: rarest shingle first (ties by id), so that prefixes hold the shingles few texts share
    every_id = np.concatenate(id_sets) if id_sets else np.zeros(0, np.uint64)
    unique_ids, counts = np.unique(every_id, return_counts=True)
    rank_of = np.empty(len(unique_ids), dtype=np.int64)
    rank_of[np.lexsort((unique_ids, counts))] = np.arange(len(unique_ids))
    ranks = [np.sort(rank_of[np.searchsorted(unique_ids, ids)]) for ids in id_sets]
    return NearDuplicates(text_id, ranks, threshold)
