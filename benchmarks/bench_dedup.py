"""Near-duplicate detection (sd_plugin.stats.near_duplicates) on collapsed and diverse corpora: time and peak RSS.

    python benchmarks/bench_dedup.py                  # the table in benchmarks/README.md
    python benchmarks/bench_dedup.py --case collapsed:1000 --case diverse:10000
    # before (commit 836a785, every pair of a bucket listed):
    git worktree add /tmp/sd-plugin-836a785 836a785
    PYTHONPATH=/tmp/sd-plugin-836a785 python benchmarks/bench_dedup.py --case collapsed:1000 --case collapsed:2000 \
        --case diverse:10000

Each case runs in a fresh subprocess (so peak RSS is that case's own) and does what `sd-plugin mix` and
`sd-plugin stats` do with the structure: detect (shingles, MinHash, LSH buckets), flag rows that have a near
duplicate, cluster rows, and keep the first row of each near-duplicate set.

collapsed:N  N near-identical rows: one 60-word answer template whose 8th word is one of N numbers (every pair
             has Jaccard 0.90, everything lands in the same buckets: the case a collapsed round-2 corpus is);
template:N   N short template-filled texts, one number changing ("... the tool number 17 again"): every pair
             shares most shingles (Jaccard 0.69) and none is a near duplicate (a round-2 corpus of one template);
diverse:N    N random 60-word texts over a 5,000-word vocabulary (nearly no candidate pairs).
"""

from __future__ import annotations

import argparse
import inspect
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

DEFAULT_CASES = ["template:1000", "template:4000", "template:16000", "template:64000",
                 "collapsed:1000", "collapsed:10000", "collapsed:100000", "diverse:10000"]


def corpus(kind: str, rows: int) -> list[str]:
    import numpy as np

    if kind == "collapsed":
        words = [f"w{i}" for i in range(60)]
        return [" ".join(words[:7] + [f"n{i}"] + words[8:]) for i in range(rows)]
    if kind == "template":
        return [f"the same scenario text about the agent and the tool number {i} again" for i in range(rows)]
    if kind == "diverse":
        rng = np.random.default_rng(0)
        vocabulary = np.array([f"v{i}" for i in range(5000)])
        return [" ".join(rng.choice(vocabulary, size=60)) for _ in range(rows)]
    raise ValueError(f"unknown corpus kind {kind!r}: template, collapsed or diverse")


def run_case(case: str) -> dict:
    """In this process: time each step on the case's corpus, then report peak RSS."""
    from sd_plugin.stats import near_duplicates

    kind, rows = case.split(":")
    texts = corpus(kind, int(rows))
    started = time.perf_counter()
    quiet = {"progress": False} if "progress" in inspect.signature(near_duplicates).parameters else {}
    structure = near_duplicates(texts, 0.8, **quiet)
    detected = time.perf_counter()
    flags = structure.has_near_duplicate()
    clusters = structure.clusters()
    # keep_first: the mixer's dedup; older versions (the "before" row) did it from `neighbors` in the mixer
    kept = structure.keep_first(list(range(len(texts)))) if hasattr(structure, "keep_first") else None
    finished = time.perf_counter()
    return {
        "case": case, "rows": len(texts), "detect_s": detected - started, "flags_clusters_keep_s": finished - detected,
        "total_s": finished - started, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "with_near_duplicate": sum(flags), "clusters": len(set(clusters)), "kept": None if kept is None else len(kept),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", action="append", default=None, help="KIND:ROWS (repeatable; default: the table's)")
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_case(args.child)))
        return
    import sd_plugin

    print(f"sd_plugin from {Path(sd_plugin.__file__).parent}")
    header = f"{'case':<18} {'rows':>7} {'detect s':>9} {'flag+cluster+keep s':>20} {'total s':>8} {'peak RSS MB':>12} " \
             f"{'flagged':>8} {'clusters':>9} {'kept':>7}"
    print(header)
    print("-" * len(header))
    for case in args.case or DEFAULT_CASES:
        output = subprocess.run([sys.executable, __file__, "--child", case], check=True, capture_output=True, text=True)
        r = json.loads(output.stdout.strip().splitlines()[-1])
        print(f"{r['case']:<18} {r['rows']:>7} {r['detect_s']:>9.2f} {r['flags_clusters_keep_s']:>20.2f} "
              f"{r['total_s']:>8.2f} {r['peak_rss_mb']:>12.0f} {r['with_near_duplicate']:>8} {r['clusters']:>9} "
              f"{'-' if r['kept'] is None else r['kept']:>7}", flush=True)


if __name__ == "__main__":
    main()
