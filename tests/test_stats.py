"""Corpus statistics and evaluation metrics against values computed by hand on small fixtures written here."""

import importlib.util
import itertools
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

import sd_plugin.dedup as dedup
from sd_plugin.cli import main as cli_main
from sd_plugin.dedup import jaccard, near_duplicates, shingles, tokenize
from sd_plugin.stats import (
    Scenario,
    auc_mann_whitney,
    average_ranks,
    bootstrap_intervals,
    corpus_stats,
    evaluation_metrics,
    read_jsonl,
)

REPO = Path(__file__).resolve().parents[1]

# 5 word-3-grams each; CAT_TODAY and CAT_YESTERDAY share 4 of 6 distinct ones: Jaccard 4/6
CAT_TODAY = "The cat sat on the mat today"
CAT_YESTERDAY = "the cat sat on the mat yesterday"
UNRELATED = "a completely different sentence about tool calls"


def write_jsonl(path, rows):
    path.write_text("".join((row if isinstance(row, str) else json.dumps(row)) + "\n" for row in rows))
    return str(path)


def test_corpus_stats_match_hand_computed_values():
    rows = [
        {"template_id": "A", "reward": 0.2, "text": "a b a"},
        {"template_id": "A", "reward": 0.4, "text": "a b c"},
        {"template_id": "B", "reward": 0.6},
        {"template_id": "C", "reward": "bad"},  # not numeric: left out of the reward statistics only
    ]
    result = corpus_stats(rows, catalog_size=10)
    assert result["n"] == 4 and result["n_reward"] == 3
    assert result["reward_mean"] == pytest.approx(0.4)
    assert result["reward_std"] == pytest.approx(math.sqrt((0.04 + 0.0 + 0.04) / 3))
    assert result["unique_groups"] == 3 and result["coverage"] == pytest.approx(0.3)
    # shares 1/2, 1/4, 1/4: H = 1/2 ln 2 + 2 * 1/4 ln 4 = 1.5 ln 2
    assert result["group_entropy"] == pytest.approx(1.5 * math.log(2))
    assert result["effective_groups"] == pytest.approx(2**1.5)
    assert result["top10_share"] == pytest.approx(1.0)
    assert result["top_groups"][0] == ["A", 2] and result["group_counts"] == [2, 1, 1]
    # unigrams a b a a b c: 3 distinct of 6; bigrams ab ba ab bc: 3 distinct of 4
    assert result["distinct_1"] == pytest.approx(0.5)
    assert result["distinct_2"] == pytest.approx(0.75)


def test_top10_share_and_entropy_of_a_skewed_distribution():
    rows = [{"template_id": "big", "reward": 0.0}] * 90 + [{"template_id": f"t{i}", "reward": 0.0} for i in range(20)]
    result = corpus_stats(rows)
    assert result["unique_groups"] == 21
    assert result["top10_share"] == pytest.approx((90 + 9) / 110)
    shares = np.array([90] + [1] * 20) / 110
    assert result["group_entropy"] == pytest.approx(float(-(shares * np.log(shares)).sum()))


def test_jaccard_and_near_duplicate_rate_by_hand():
    assert jaccard(shingles(tokenize(CAT_TODAY)), shingles(tokenize(CAT_YESTERDAY))) == pytest.approx(4 / 6)
    rows = [{"text": CAT_TODAY}, {"text": CAT_YESTERDAY}, {"text": UNRELATED}]
    assert corpus_stats(rows, dedup_threshold=0.6)["near_dup_rate"] == pytest.approx(2 / 3)
    assert corpus_stats(rows, dedup_threshold=0.7)["near_dup_rate"] == 0.0
    exact_copies = [{"completion": UNRELATED}, {"completion": UNRELATED}, {"completion": CAT_TODAY}]
    assert corpus_stats(exact_copies, dedup_threshold=0.99)["near_dup_rate"] == pytest.approx(2 / 3)


def test_groups_fall_back_to_near_duplicate_clusters_without_group_field():
    rows = [{"text": CAT_TODAY, "reward": 1}, {"text": CAT_YESTERDAY, "reward": 1}, {"text": UNRELATED, "reward": 1}]
    result = corpus_stats(rows, dedup_threshold=0.6)
    assert result["unique_groups"] == 2 and result["group_counts"] == [2, 1]
    assert result["group_source"].startswith("near-duplicate clusters")


def test_pairs_right_at_the_threshold_are_all_found():
    """The join is exact: pairs at exactly the threshold (which MinHash LSH missed ~1% of) are all found."""
    rng = np.random.default_rng(3)
    texts = [" ".join(rng.choice([f"w{i}" for i in range(60)], size=20)) for _ in range(250)]
    texts += [t.rsplit(" ", 1)[0] + " changed" for t in texts[:50]]  # 50 near duplicates at Jaccard 17/19
    at_threshold = [" ".join(t.split()[:-2]) + " two changed" for t in texts[50:100]]  # Jaccard 16/20 = 0.8
    structure = near_duplicates(texts + at_threshold, 0.8)
    assert structure.neighbors == reference_neighbors(texts + at_threshold, 0.8)[1]
    assert sum(structure.has_near_duplicate()) == 200


def test_read_jsonl_reports_line_numbers(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", ['{"reward": 1}', "", "{not json", "[1, 2]", '{"reward": 2}'])
    rows, errors = read_jsonl(path)
    assert [line for line, _ in rows] == [1, 5]
    assert [(e.line, e.message.split(" ")[0]) for e in errors] == [(3, "invalid"), (4, "expected")]
    assert str(errors[0]).startswith(f"{path}:3: invalid JSON")


# ----------------------------------------------------------------------------------------------- evaluation
def naive_auc(good, bad):
    return sum(1.0 if g > b else 0.5 if g == b else 0.0 for g in good for b in bad) / (len(good) * len(bad))


# per-scenario rewards (2 generations each); scenario means: good 0.9, 0.5, 0.3 and bad 0.5, 0.2, 0.1
SCENARIOS = {
    ("g1", "good"): [0.8, 1.0], ("g2", "good"): [0.4, 0.6], ("g3", "good"): [0.3, 0.3],
    ("b1", "bad"): [0.5, 0.5], ("b2", "bad"): [0.1, 0.3], ("b3", "bad"): [0.1, 0.1],
}
PASSES = {"g1": [True, True], "g2": [True, False], "g3": [False, False],
          "b1": [True, False], "b2": [False, False], "b3": [True, True]}


def scored_rows(stage="r1", shift=0.0):
    return [{"stage": stage, "scenario_id": sid, "label": label, "reward": reward + shift, "R_A_pass": passed}
            for (sid, label), rewards in SCENARIOS.items() for reward, passed in zip(rewards, PASSES[sid])]


def scenarios_from(rows):
    by_id = {}
    for row in rows:
        label = int(row["label"] == "good")
        scenario = by_id.setdefault(row["scenario_id"], Scenario(row["scenario_id"], label, [], {"R_A_pass": []}))
        scenario.rewards.append(row["reward"])
        scenario.passes["R_A_pass"].append(row["R_A_pass"])
    return list(by_id.values())


def test_auc_by_hand_with_ties():
    # pairs good > bad: 0.9 beats 3; 0.5 ties 0.5 and beats 2 (2.5); 0.3 beats 2: 7.5 of 9
    assert auc_mann_whitney([0.9, 0.5, 0.3], [0.5, 0.2, 0.1]) == pytest.approx(7.5 / 9)
    assert auc_mann_whitney([1, 1], [1, 1]) == 0.5 and auc_mann_whitney([], [1]) is None
    assert list(average_ranks(np.array([3.0, 1.0, 3.0, 2.0]))) == [3.5, 1.0, 3.5, 2.0]
    rng = np.random.default_rng(0)
    good, bad = rng.integers(0, 5, 40) / 4, rng.integers(0, 5, 30) / 4  # many ties
    assert auc_mann_whitney(good, bad) == pytest.approx(naive_auc(good, bad))


def test_evaluation_metrics_by_hand():
    metrics = evaluation_metrics(scenarios_from(scored_rows()), ["R_A_pass"])
    assert metrics["mean_R"] == pytest.approx(5.0 / 12)
    assert metrics["good_mean"] == pytest.approx(3.4 / 6)
    assert metrics["bad_mean"] == pytest.approx(1.6 / 6)
    assert metrics["pass_rate:R_A_pass"] == pytest.approx(6 / 12)
    assert metrics["auc"] == pytest.approx(7.5 / 9)
    generation_level = evaluation_metrics(scenarios_from(scored_rows()), [], auc_level="generation")["auc"]
    good = [0.8, 1.0, 0.4, 0.6, 0.3, 0.3]
    bad = [0.5, 0.5, 0.1, 0.3, 0.1, 0.1]
    assert generation_level == pytest.approx(naive_auc(good, bad))


def test_bootstrap_is_seeded_and_brackets_the_estimate():
    scenarios = scenarios_from(scored_rows())
    first = bootstrap_intervals(scenarios, ["R_A_pass"], "scenario", 300, seed=1)
    assert first == bootstrap_intervals(scenarios, ["R_A_pass"], "scenario", 300, seed=1)
    assert first != bootstrap_intervals(scenarios, ["R_A_pass"], "scenario", 300, seed=2)
    point = evaluation_metrics(scenarios, ["R_A_pass"])
    for key, (low, high) in first.items():
        assert low <= point[key] <= high, key


def test_eval_stats_cli_side_by_side(tmp_path, capsys):
    def without_stage(rows):
        return [{k: v for k, v in row.items() if k != "stage"} for row in rows]

    base = write_jsonl(tmp_path / "base.jsonl", without_stage(scored_rows(shift=-0.1)))
    r1 = write_jsonl(tmp_path / "r1.jsonl", without_stage(scored_rows()))
    out = tmp_path / "eval.json"
    code = cli_main(["eval-stats", base, r1, "--stage-names", "base,r1", "--pass-field", "R_A_pass",
                     "--bootstrap", "50", "--json", str(out)])
    assert code == 0
    printed = capsys.readouterr().out
    assert "base" in printed and "r1" in printed and "AUC (scenario)" in printed and "R_A_pass pass rate" in printed
    result = json.loads(out.read_text())["stages"]
    assert list(result) == ["base", "r1"]
    assert result["r1"]["auc"] == pytest.approx(7.5 / 9) and result["base"]["auc"] == pytest.approx(7.5 / 9)
    assert result["base"]["mean_R"] == pytest.approx(5.0 / 12 - 0.1)
    assert result["r1"]["n_good"] == 3 and result["r1"]["n_generations"] == 12
    assert set(result["r1"]["ci"]) == {"mean_R", "good_mean", "bad_mean", "pass_rate:R_A_pass", "auc"}


def test_eval_stats_cli_refuses_invalid_rows_with_line_numbers(tmp_path, capsys):
    rows = scored_rows()
    rows[1] = {**rows[1], "label": "maybe"}
    rows[4] = {**rows[4], "reward": None}
    path = write_jsonl(tmp_path / "scored.jsonl", rows)
    assert cli_main(["eval-stats", path, "--bootstrap", "0"]) == 2
    err = capsys.readouterr().err
    assert f"{path}:2: label 'maybe'" in err and f"{path}:5: non-numeric reward" in err
    assert err.splitlines()[-1] == f"sd-plugin eval-stats: {path}:2: label 'maybe' is not good/bad/1/0 (2 invalid rows in all)"


@pytest.mark.parametrize("threshold", ["0", "1.5", "nan"])
def test_stats_cli_refuses_a_dedup_threshold_outside_0_1(tmp_path, capsys, threshold):
    path = write_jsonl(tmp_path / "r.jsonl", [{"text": "a b c"}])
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["stats", path, "--dedup-threshold", threshold, "--json", str(tmp_path / "s.json")])
    assert exit_info.value.code == 2 and "--dedup-threshold must be in (0, 1]" in capsys.readouterr().err
    assert not (tmp_path / "s.json").exists()


def test_stats_cli_table_json_and_plot(tmp_path, capsys):
    rows = [{"template_id": f"t{i % 5}", "reward": i / 10, "text": f"row {i}"} for i in range(10)]
    first = write_jsonl(tmp_path / "r1.jsonl", rows)
    second = write_jsonl(tmp_path / "r2.jsonl", [{"template_id": "t0", "reward": 0.5, "text": "same"}] * 4)
    code = cli_main(["stats", first, second, "--catalog-size", "540", "--json", str(tmp_path / "s.json"),
                     "--plot", str(tmp_path / "s.png")])
    assert code == 0
    captured = capsys.readouterr()
    assert "r1.jsonl" in captured.out and "catalog coverage" in captured.out
    corpora = json.loads((tmp_path / "s.json").read_text())["corpora"]
    assert [c["unique_groups"] for c in corpora] == [5, 1]
    assert corpora[1]["near_dup_rate"] == 1.0
    assert corpora[0]["coverage"] == pytest.approx(5 / 540)
    assert (tmp_path / "s.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ near duplicates: near-linear, same answers
def reference_neighbors(texts, threshold):
    """The definition: every pair of distinct texts with word-3-gram Jaccard >= threshold, by checking all pairs."""
    distinct = {}
    text_id = [-1 if text is None else distinct.setdefault(text, len(distinct)) for text in texts]
    sets = [shingles(tokenize(text)) for text in distinct]
    neighbors = [set() for _ in sets]
    for first, second in itertools.combinations(range(len(sets)), 2):
        if jaccard(sets[first], sets[second]) >= threshold:
            neighbors[first].add(second)
            neighbors[second].add(first)
    return text_id, neighbors


def reference_answers(texts, threshold, priority):
    text_id, neighbors = reference_neighbors(texts, threshold)
    present = Counter(text_id)
    flags = [tid >= 0 and (present[tid] > 1 or any(o in present for o in neighbors[tid])) for tid in text_id]
    graph_components = {}
    for start in range(len(neighbors)):  # components by search, unlike the union-find under test
        if start not in graph_components:
            stack = [start]
            while stack:
                node = stack.pop()
                if node not in graph_components:
                    graph_components[node] = start
                    stack.extend(neighbors[node])
    kept, kept_ids = [], set()
    for row in priority:
        tid = text_id[row]
        if tid >= 0 and (tid in kept_ids or not kept_ids.isdisjoint(neighbors[tid])):
            continue
        kept.append(row)
        kept_ids.add(tid)
    return text_id, neighbors, flags, graph_components, kept


def same_partition(first, second):
    return len(set(first)) == len(set(zip(first, second))) == len(set(second))


def normal_corpora():
    rng = np.random.default_rng(7)
    vocabulary = [f"w{i}" for i in range(80)]
    base = [" ".join(rng.choice(vocabulary, size=24)) for _ in range(260)]
    edited = []
    for text in base[:120]:  # one to four words replaced: Jaccard from about 0.9 down to about 0.6
        words = text.split()
        for position in rng.choice(len(words), size=int(rng.integers(1, 5)), replace=False):
            words[position] = f"x{rng.integers(0, 5)}"
        edited.append(" ".join(words))
    synthetic = importlib.util.spec_from_file_location("synthetic", REPO / "tests" / "fixtures" / "mixer" / "synthetic.py")
    module = importlib.util.module_from_spec(synthetic)
    synthetic.loader.exec_module(module)
    round1, round2 = module.synthetic_rounds(seed=0, rows=400)
    mixer_texts = [row["completion"] for row in round1 + round2]
    small = base[:40] + edited[:30] + [None, "", "", base[0]]
    return {"edited": base + edited + [base[3], None, ""], "mixer rounds": mixer_texts, "small": small}


@pytest.mark.parametrize("name", ["edited", "mixer rounds", "small"])
@pytest.mark.parametrize("threshold", [0.6, 0.8])
def test_near_duplicate_answers_equal_the_all_pairs_definition(name, threshold):
    texts = normal_corpora()[name]
    priority = list(np.random.default_rng(1).permutation(len(texts)))
    text_id, neighbors, flags, components, kept = reference_answers(texts, threshold, priority)
    structure = near_duplicates(texts, threshold)
    assert sum(map(len, neighbors)) > 0  # the corpus has near duplicates to find
    assert structure.text_id == text_id and structure.neighbors == neighbors
    assert structure.has_near_duplicate() == flags
    subset = priority[: len(texts) // 2]
    present = Counter(text_id[row] for row in subset)
    assert structure.has_near_duplicate(subset) == [
        text_id[row] >= 0 and (present[text_id[row]] > 1 or any(o in present for o in neighbors[text_id[row]]))
        for row in subset]
    clusters = structure.clusters()
    expected_clusters = [components[tid] if tid >= 0 else ("lonely", row) for row, tid in enumerate(text_id)]
    assert same_partition(clusters, expected_clusters)
    assert structure.keep_first(priority) == kept


def test_near_duplicates_of_a_collapsed_corpus_take_a_few_comparisons_per_text(monkeypatch):
    """3,000 near-identical texts share every bucket: listing the pairs of a bucket meant 4.5 million Jaccards
    per band; each answer now takes a few comparisons per text."""
    words = [f"w{i}" for i in range(40)]
    texts = [" ".join(words[:7] + [f"n{i}"] + words[8:]) for i in range(3000)]
    structure = near_duplicates(texts, 0.8)
    comparisons = []
    real_jaccard = dedup.id_jaccard
    monkeypatch.setattr(dedup, "id_jaccard", lambda a, b: (comparisons.append(1), real_jaccard(a, b))[1])
    assert all(structure.has_near_duplicate())
    assert len(set(structure.clusters())) == 1
    assert structure.keep_first(list(range(len(texts)))) == [0]
    assert len(comparisons) < 10 * len(texts)


def test_a_template_corpus_below_the_threshold_takes_a_few_comparisons_per_text(monkeypatch):
    """One template with a changing number: every pair shares most shingles (Jaccard 0.69) and none is a near
    duplicate. MinHash LSH put them all in one bucket and compared every pair (128 s for 4,000 rows); the
    positional filter skips the shared shingles' group whole."""
    texts = [f"the same scenario text about the agent and the tool number {i} again" for i in range(3000)]
    structure = near_duplicates(texts, 0.8)
    comparisons = []
    real_jaccard = dedup.id_jaccard
    monkeypatch.setattr(dedup, "id_jaccard", lambda a, b: (comparisons.append(1), real_jaccard(a, b))[1])
    assert not any(structure.has_near_duplicate())
    assert len(set(structure.clusters())) == len(texts)
    assert structure.keep_first(list(range(len(texts)))) == list(range(len(texts)))
    assert len(comparisons) < 10 * len(texts)


def test_mixer_removes_the_same_near_duplicates_as_the_all_pairs_definition(tmp_path):
    from sd_plugin.mixer import CorpusSource, MixConfig, mix_corpora

    texts = normal_corpora()["edited"]
    rows = [{"text": text, "reward": float(i % 7) / 7} for i, text in enumerate(texts) if text is not None]
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    result = mix_corpora([CorpusSource(path, 1)], MixConfig(size=10_000, mix_in_ratio=0.0))
    priority = sorted(range(len(rows)), key=lambda i: (-rows[i]["reward"], i))
    kept = reference_answers([row["text"] for row in rows], 0.8, priority)[-1]
    assert sorted(row["_provenance"]["line"] - 1 for row in result.rows) == sorted(kept)
    assert result.counts["near_duplicates_removed"] == len(rows) - len(kept)
