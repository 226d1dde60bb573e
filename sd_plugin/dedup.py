"""Near-duplicate detection of texts: word 3-gram shingles compared by Jaccard similarity.

Up to EXACT_PAIRS_LIMIT distinct texts every pair is compared; above, MinHash signatures and LSH banding find the
candidate pairs, which are then compared exactly. `near_duplicates(texts, threshold)` returns `NearDuplicates`:
`has_near_duplicate()`, `clusters()` and `keep_first(rows)` (the mixer's dedup). Used by `sd-plugin stats`
(collapse onto a few templates) and `sd-plugin mix`; benchmarks/bench_dedup.py measures it.
"""

from __future__ import annotations

import itertools
import re
import zlib
from collections import Counter, defaultdict

import numpy as np
from tqdm import tqdm

TOKEN_PATTERN = re.compile(r"\w+|[^\w\s]")
EXACT_PAIRS_LIMIT = 200  # up to this many distinct texts every pair is compared; above, MinHash LSH
MINHASH_PERMUTATIONS = 128
MINHASH_PRIME = (1 << 32) - 5  # largest prime below 2^32: a*x + b with a, x, b < p fits in uint64
CHUNK_SHINGLES = 16_384  # shingles hashed per vectorised MinHash pass: 128 x 16,384 x 8 bytes = 16 MB
PROGRESS_FROM = 20_000  # distinct texts from which near-duplicate detection shows a progress bar


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
