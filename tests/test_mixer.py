"""Mixer on a synthetic collapsed corpus: coverage, caps, ratio, determinism, provenance, malformed rows."""

import importlib.util
import json
import math
from collections import Counter
from pathlib import Path

import pytest

from sd_plugin.cli import main as cli_main
from sd_plugin.dedup import near_duplicates
from sd_plugin.mixer import (
    CorpusSource,
    DiversityPenalizedReward,
    MixConfig,
    MixError,
    diversity_penalty,
    mix_corpora,
    mix_from_config,
)

SYNTHETIC = Path(__file__).parent / "fixtures" / "mixer" / "synthetic.py"


def load_synthetic():
    spec = importlib.util.spec_from_file_location("mixer_synthetic", SYNTHETIC)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def rounds(tmp_path_factory):
    """round1.jsonl: 400 rows over 170 of 540 templates; round2.jsonl: 400 rows over 90 (60 shared), skewed,
    with near-duplicate completions. Union: 200 templates."""
    synthetic = load_synthetic()
    directory = tmp_path_factory.mktemp("rounds")
    round1, round2 = synthetic.synthetic_rounds(seed=0, rows=400)
    synthetic.write_jsonl(directory / "round1.jsonl", round1)
    synthetic.write_jsonl(directory / "round2.jsonl", round2)
    return str(directory / "round1.jsonl"), str(directory / "round2.jsonl")


def sources(rounds):
    return [CorpusSource(rounds[0], 1), CorpusSource(rounds[1], 2)]


def source_lines(path):
    return {number: json.loads(line) for number, line in enumerate(Path(path).read_text().splitlines(), start=1)}


def test_synthetic_rounds_are_collapsed(rounds):
    groups = [{json.loads(line)["template_id"] for line in Path(path).read_text().splitlines()} for path in rounds]
    assert (len(groups[0]), len(groups[1]), len(groups[0] | groups[1])) == (170, 90, 200)


@pytest.mark.parametrize("size", [150, 600])
def test_coverage_is_maximal_under_the_size_target(rounds, size):
    result = mix_corpora(sources(rounds), MixConfig(size=size, seed=0, group_cap=8))
    counts = Counter(row["template_id"] for row in result.rows)
    assert len(result.rows) == size
    assert len(counts) == min(size, 200)
    assert max(counts.values()) <= 8
    assert result.summary["after"]["unique_groups"] == min(size, 200)


def test_coverage_comes_before_the_ratio_then_the_ratio_holds(rounds):
    # 110 templates exist only in round 1: covering 200 templates in 400 rows needs >= 110 round-1 rows
    forced = mix_corpora(sources(rounds), MixConfig(size=400, mix_in_ratio=0.25, seed=0))
    assert forced.counts["selected_by_round"] == {"1": 110, "2": 290}
    free = mix_corpora(sources(rounds), MixConfig(size=500, mix_in_ratio=0.3, seed=0))
    assert free.counts["selected_by_round"] == {"1": 150, "2": 350}
    assert len({row["template_id"] for row in free.rows}) == 200


def test_rows_are_neither_lost_nor_duplicated(rounds):
    result = mix_corpora(sources(rounds), MixConfig(size=500, seed=3))
    originals = {path: source_lines(path) for path in rounds}
    keys = [(row["_provenance"]["source"], row["_provenance"]["line"]) for row in result.rows]
    assert len(set(keys)) == len(keys) == 500
    for row in result.rows:
        provenance = row["_provenance"]
        assert provenance["round"] == (1 if provenance["source"] == rounds[0] else 2)
        original = originals[provenance["source"]][provenance["line"]]
        assert {k: v for k, v in row.items() if k != "_provenance"} == original


def test_filters_reward_floor_and_near_duplicates(rounds):
    result = mix_corpora(sources(rounds), MixConfig(size=10_000, seed=0, reward_floor=0.4, dedup_threshold=0.8))
    assert min(row["reward"] for row in result.rows) >= 0.4
    assert not any(near_duplicates([row["completion"] for row in result.rows], 0.8).has_near_duplicate())
    counts = result.counts
    assert counts["near_duplicates_removed"] > 0 and counts["below_reward_floor"] > 0
    assert counts["valid"] - counts["below_reward_floor"] - counts["near_duplicates_removed"] == len(result.rows)
    assert any("size target 10000 not reached" in warning for warning in result.warnings)


def test_default_size_keeps_every_latest_round_row(rounds):
    result = mix_corpora(sources(rounds), MixConfig(mix_in_ratio=0.5, dedup_threshold=None))
    assert result.counts["selected_by_round"] == {"1": 400, "2": 400}


def test_groups_without_group_field_come_from_text_clusters(tmp_path):
    rows = [{"completion": f"answer number {i} with extra words {i % 7}", "reward": 0.5} for i in range(30)]
    rows += [{"completion": "the same answer again and again", "reward": 0.5}] * 20
    path = tmp_path / "r.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    result = mix_corpora([CorpusSource(str(path), 1)], MixConfig(size=31, mix_in_ratio=0.0))
    assert result.summary["group_source"].startswith("near-duplicate clusters")
    assert result.counts["near_duplicates_removed"] == 19 and len(result.rows) == 31


def test_cli_is_deterministic_per_seed(rounds, tmp_path, capsys):
    outputs = []
    for name, seed in [("a", 7), ("b", 7), ("c", 8)]:
        out = tmp_path / f"{name}.jsonl"
        assert cli_main(["mix", *rounds, "--out", str(out), "--size", "300", "--seed", str(seed), "--group-cap", "6",
                         "--summary", str(tmp_path / f"{name}.json"), "--catalog-size", "540"]) == 0
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1] and outputs[0] != outputs[2]
    printed = capsys.readouterr().out
    assert "union" in printed and "mixed" in printed and "wrote 300 rows" in printed
    summary = json.loads((tmp_path / "a.json").read_text())
    assert [s["name"] for s in summary["before"]] == ["round1.jsonl", "round2.jsonl", "union"]
    assert summary["before"][2]["unique_groups"] == 200 and summary["after"]["unique_groups"] == 200
    assert summary["after"]["coverage"] == pytest.approx(200 / 540)


def test_mix_from_config_is_the_same_mix_as_the_cli(rounds, tmp_path):
    assert cli_main(["mix", rounds[1], rounds[0], "--rounds", "2,1", "--out", str(tmp_path / "cli.jsonl"),
                     "--size", "250", "--seed", "5", "--group-cap", "4", "--dedup-threshold", "0.9"]) == 0
    block = {"inputs": [{"path": rounds[1], "round": 2}, {"path": rounds[0], "round": 1}],
             "output_path": str(tmp_path / "config.jsonl"), "size": 250, "seed": 5, "group_cap": 4,
             "dedup_threshold": 0.9, "summary_path": str(tmp_path / "summary.json")}
    assert mix_from_config(block) == str(tmp_path / "config.jsonl")
    assert (tmp_path / "config.jsonl").read_bytes() == (tmp_path / "cli.jsonl").read_bytes()
    assert (tmp_path / "summary.json").exists()
    with pytest.raises(ValueError, match="unknown key"):
        mix_from_config({**block, "group_cpa": 3})


@pytest.fixture
def malformed(tmp_path, rounds):
    lines = ['{"template_id": "t1", "reward": 0.5, "text": "fine"}', '{"template_id": "t2", "reward": 0.5',
             '{"template_id": "t3", "text": "no reward"}', '{"template_id": "t4", "reward": "high"}',
             '{"template_id": "t5", "reward": 0.9, "text": "also fine"}']
    path = tmp_path / "bad.jsonl"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def test_malformed_rows_are_refused_with_line_numbers_and_nothing_written(malformed, rounds, tmp_path, capsys):
    out = tmp_path / "mixed.jsonl"
    assert cli_main(["mix", rounds[0], malformed, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    for line, reason in [(2, "invalid JSON"), (3, "missing reward field 'reward'"), (4, "non-numeric reward 'high'")]:
        assert f"{malformed}:{line}: {reason}" in err
    assert err.splitlines()[-1].startswith(f"sd-plugin mix: {malformed}:2: invalid JSON")
    assert "3 malformed row(s)" in err and not out.exists()
    assert list(tmp_path.glob(".mixed.jsonl.*")) == []
    out.write_text("previous mix\n")  # a failed run leaves an earlier output alone
    assert cli_main(["mix", rounds[0], malformed, "--out", str(out)]) == 2
    assert out.read_text() == "previous mix\n"
    with pytest.raises(MixError) as raised:
        mix_corpora([CorpusSource(malformed, 1)], MixConfig())
    assert [error.line for error in raised.value.errors] == [2, 3, 4]


def test_skip_invalid_writes_rejects(malformed, tmp_path, capsys):
    out, rejects = tmp_path / "mixed.jsonl", tmp_path / "rejects.jsonl"
    argv = ["mix", malformed, "--out", str(out), "--skip-invalid", "--rejects", str(rejects), "--mix-in-ratio", "0"]
    assert cli_main(argv) == 0
    captured = capsys.readouterr()
    assert "skipped 3 malformed row(s)" in captured.out and f"{malformed}:4: non-numeric reward" in captured.err
    assert [json.loads(line)["line"] for line in rejects.read_text().splitlines()] == [2, 3, 4]
    assert [json.loads(line)["_provenance"]["line"] for line in out.read_text().splitlines()] == [1, 5]


def test_an_input_given_twice_is_refused(rounds):
    with pytest.raises(ValueError, match="given twice"):
        mix_corpora([CorpusSource(rounds[0], 1), CorpusSource(rounds[0], 2)], MixConfig())


def test_diversity_penalized_reward_counts_groups():
    def base_reward(prompt, completion, record):
        return 1.0, "feedback"

    wrapped = DiversityPenalizedReward(base_reward, penalty=0.2)
    scores = [wrapped("p", "c", {"template_id": group}) for group in ["A", "A", "B", "A"]]
    # 4th call: A has 3 of 4 samples over 2 groups seen (expected 2): penalty 0.2 * log2(3 / 2)
    assert scores == [(1.0, "feedback")] * 3 + [(pytest.approx(1.0 - 0.2 * math.log2(1.5)), "feedback")]
    # with a catalog of 4 groups the expected count stays 1 for 4 samples: the 2nd A is 2x over, the 3rd 3x
    catalog_aware = DiversityPenalizedReward(base_reward, penalty=0.2, num_groups=4, group_fn=lambda p, c, r: len(c))
    assert [catalog_aware("p", "cc", None)[0] for _ in range(3)] == pytest.approx([1.0, 0.8, 1.0 - 0.2 * math.log2(3)])
    catalog_aware.reset()
    assert not catalog_aware.counts
    assert diversity_penalty(2, 2.0, 1.0) == 0.0 and diversity_penalty(8, 2.0, 0.5) == pytest.approx(1.0)


def test_diversity_penalty_tightens_the_reward_floor(rounds):
    plain = mix_corpora(sources(rounds), MixConfig(size=10_000, reward_floor=0.3, dedup_threshold=None))
    penalised_config = MixConfig(size=10_000, reward_floor=0.3, dedup_threshold=None, diversity_penalty=0.05)
    penalised = mix_corpora(sources(rounds), penalised_config)
    assert penalised.counts["below_reward_floor"] > plain.counts["below_reward_floor"]
    assert {row["template_id"] for row in penalised.rows} <= {row["template_id"] for row in plain.rows}


def test_the_notebooks_round2_mixer_yaml_trains_sdft_on_the_mixed_rows(rounds, tmp_path, tokenizer):
    """The `datasets:` entry shown with the `round2_mixer:` block maps the kept completion to the demonstration:
    the Axolotl SDFT strategy tokenizes every mixed row (it used to stop at "missing column 'demonstration'")."""
    import nbformat
    import yaml

    from sd_plugin.axolotl.strategies.sdft import load

    notebook = nbformat.read(str(Path(__file__).parents[1] / "colab" / "round2_mixer.ipynb"), as_version=4)
    block = next(cell.source for cell in notebook.cells if cell.cell_type == "markdown" and "```yaml" in cell.source)
    config = yaml.safe_load(block.split("```yaml\n", 1)[1].split("```", 1)[0])
    dataset = config["datasets"][0]
    assert dataset["type"] == "sd_plugin.axolotl.strategies.sdft"
    result = mix_corpora(sources(rounds), MixConfig(size=40))
    strategy = load(tokenizer, {"plugins": ["sd_plugin.SelfDistillationPlugin"], "trainer_type": "sdft"}, dataset)
    batch = {key: [row.get(key) for row in result.rows] for key in result.rows[0]}
    tokenized = strategy.tokenize_prompt(batch)
    assert len(tokenized["input_ids"]) == len(result.rows) == 40
    first = result.rows[0]
    assert tokenizer.decode(tokenized["demonstration_ids"][0]).startswith(first["completion"][:20])
