"""Learning on a real model (SmolLM2-135M-Instruct, `sd-plugin demo-model`): tests that fail when learning breaks.

The contact-card task (sd_plugin.demo_task): a message about a person becomes one line of JSON; the prompt
does not describe the format, so the base model scores 0. The SDFT test is a run of
`benchmarks/bench_sft_vs_sdft.py` (same data, LoRA, seed and settings; its SFT rows are the comparison, left to
the benchmark for suite time), scored here on the first 24 of its 48
held-out cards to keep the test short; the SDPO test is `benchmarks/bench_sdpo_demo.py`'s hybrid run on the
capital questions; the SD-Zero test is `benchmarks/bench_sdzero_demo.py`'s collection and SRT phase. Fixed seed, CPU,
fp32.
"""

from pathlib import Path

import pytest
import torch
from datasets import load_dataset
from peft import LoraConfig

from sd_plugin import SDFTConfig, SDFTTrainer

DATA = Path(__file__).resolve().parents[1] / "example_configs" / "assets" / "data"
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.0, task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
STEPS = 16
# The teacher template that makes the 135M base model write the card in context (98% of held-out cards,
# benchmarks/README.md); the paper's template gives 0% on this model.
JSON_TEMPLATE = "{question}\n\nAnswer with one line of JSON exactly like this:\n{demonstration}"


def train_on_contact_cards(demo_model_dir, tmp_path, prior: bool = False, **settings):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    held_out = tmp_path / "contact_test.jsonl"
    held_out.write_text("".join((DATA / "contact_test.jsonl").read_text().splitlines(keepends=True)[:24]))
    records = load_dataset("json", data_files=str(DATA / "contact_train.jsonl"), split="train").remove_columns(["answer"])
    probe = dict(prior_prompts=str(DATA / "capitals_test.jsonl"), prior_verifier="sd_plugin.demo_task:AnswerContainsVerifier") if prior else {}
    args = SDFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=STEPS, per_device_train_batch_size=4,
        lr_scheduler_type="constant_with_warmup", warmup_steps=2, seed=0, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, max_completion_length=32, max_prompt_length=256, max_teacher_prompt_length=512,
        eval_prompts=str(held_out), eval_verifier="sd_plugin.demo_task:ContactCardVerifier", eval_max_new_tokens=32,
        eval_num_generations=0,  # the assertions read the greedy scores: no sampled answers (suite time)
        **probe, **settings,
    )
    trainer = SDFTTrainer(model=model, args=args, train_dataset=records, processing_class=tokenizer,
                          peft_config=LoraConfig(**LORA))
    trainer.train()
    return {e["step"]: e for e in trainer.state.log_history if "eval_task_reward" in e}


@pytest.mark.slow
def test_sdft_teaches_the_demo_model_the_held_out_task_and_keeps_the_prior(demo_model_dir, tmp_path):
    """On-policy SDFT, the base model with the demonstration in context as teacher: the bench's
    sdft/lr0.001/seed0/.../template-json row (task 0 -> 0.646 exact, 0.833 format on 48 cards; capitals
    0.750 -> 0.906). The student never sees a demonstration token as a target, only the teacher's
    distribution over its own samples, so a rise here is the self-distillation signal at work."""
    scores = train_on_contact_cards(demo_model_dir, tmp_path, prior=True, learning_rate=1e-3, teacher_model_kind="base",
                                    teacher_template=JSON_TEMPLATE, num_loss_tokens_to_skip=0, distillation_alpha=0.0)
    before, after = scores[0], scores[STEPS]
    assert before["eval_task_reward"] == 0.0 and before["eval_task_format_rate"] == 0.0
    assert after["eval_task_format_rate"] >= 0.4, after
    assert after["eval_task_reward"] >= 0.25, after
    # What it knew: capitals answered no worse than before training (SFT at this learning rate: 0.75 -> 0.41).
    assert after["eval_prior_reward"] >= before["eval_prior_reward"] - 0.07, (before, after)


@pytest.mark.slow
def test_sdpo_hybrid_raises_the_training_reward_and_the_held_out_pass_rate_of_the_demo_model(demo_model_dir, tmp_path):
    """SDPO with its GRPO term (`sdpo_mode: hybrid`, the README's recipe for small models) on the 32 capital
    questions, 4 x 4 rollouts at temperature 1: `benchmarks/bench_sdpo_demo.py --setting hybrid` (training reward
    0.31 -> 0.81, held-out capitals sampled at T 1 0.21 -> 0.47, greedy 0.75 -> 0.72). Distillation alone collapses on
    this 135M model at every setting tried (benchmarks/README.md); the hybrid does not."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sd_plugin import SDPOConfig, SDPOTrainer
    from sd_plugin.testing import read_jsonl

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    args = SDPOConfig(
        output_dir=str(tmp_path / "out"), max_steps=8, per_device_train_batch_size=16, num_generations=4,
        learning_rate=1e-3, lr_scheduler_type="constant_with_warmup", warmup_steps=2, seed=0, logging_steps=1,
        save_strategy="no", report_to="none", use_cpu=True, max_completion_length=24, max_prompt_length=128,
        temperature=1.0, verifier="sd_plugin.demo_task:AnswerContainsVerifier", teacher_model_kind="base",
        sdpo_mode="hybrid", distillation_weight=0.5, eval_prompts=str(DATA / "capitals_heldout.jsonl"),
        eval_verifier="sd_plugin.demo_task:AnswerContainsVerifier", eval_max_new_tokens=24, eval_num_generations=4,
    )
    trainer = SDPOTrainer(model=model, args=args, train_dataset=Dataset.from_list(read_jsonl(DATA / "capitals_test.jsonl")),
                          processing_class=tokenizer, peft_config=LoraConfig(**LORA))
    trainer.train()
    rewards = [e["self_distillation/reward_mean"] for e in trainer.state.log_history if "self_distillation/reward_mean" in e]
    assert len(rewards) == 8
    assert sum(rewards[-3:]) / 3 >= sum(rewards[:3]) / 3 + 0.15, rewards
    held_out = {e["step"]: e for e in trainer.state.log_history if "eval_task_sampled_reward" in e}
    before, after = held_out[0], held_out[8]
    # Sampled answers to 32 unseen capitals (4 each, T 1) improve; the greedy answer, already 75%, holds.
    assert after["eval_task_sampled_reward"] >= before["eval_task_sampled_reward"] + 0.1, (before, after)
    assert after["eval_task_reward"] >= before["eval_task_reward"] - 0.1, (before, after)


# benchmarks/bench_sdzero_demo.py's settings (its table is quoted in docs/sdzero.md and benchmarks/README.md).
SDZERO_REVISIONS, SDZERO_SRT_STEPS = 4, 16


def held_out_scores(trainer) -> dict[int, float]:
    return {e["step"]: e["eval_task_reward"] for e in trainer.state.log_history if "eval_task_reward" in e}


@pytest.mark.slow
def test_sdzero_both_phases_raise_the_held_out_reward_of_the_demo_model(demo_model_dir, tmp_path):
    """SD-Zero end to end as `benchmarks/bench_sdzero_demo.py --distill-lr 1e-4` runs it: revisions collected from the
    demo model itself on the 32 capital questions (the bench: 15 initially correct, 39 of 128 revisions kept), SRT on
    the verified ones (LoRA; held-out greedy 0.750 -> 0.812 in the bench), merged, then self-distillation with the
    frozen SRT model as teacher (8 steps of 4 questions x 2 rollouts, lr 1e-4: 0.812 -> 0.844 in the bench; at lr 3e-4
    it fell to 0.656). Scored greedily on 32 held-out capitals."""
    from datasets import load_dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sd_plugin import SDZeroConfig, SDZeroTrainer
    from sd_plugin.revisions import RevisionOptions, collect_revisions

    verifier = "sd_plugin.demo_task:AnswerContainsVerifier"
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    revisions = tmp_path / "revisions.jsonl"
    summary = collect_revisions(model, tokenizer, str(DATA / "capitals_test.jsonl"), revisions,
                                RevisionOptions(verifier=verifier, num_revisions=SDZERO_REVISIONS, max_new_tokens=32,
                                                batch_size=8, seed=0), progress=False)
    assert 0 < summary.kept < summary.attempted * SDZERO_REVISIONS, summary

    args = SDZeroConfig(output_dir=str(tmp_path / "srt"), phase="srt", max_steps=SDZERO_SRT_STEPS, learning_rate=3e-4,
                        per_device_train_batch_size=8, max_prompt_length=128, max_completion_length=160,
                        lr_scheduler_type="constant_with_warmup", warmup_steps=2, seed=0, logging_steps=1,
                        save_strategy="no", report_to="none", use_cpu=True, eval_prompts=str(DATA / "capitals_heldout.jsonl"),
                        eval_verifier=verifier, eval_max_new_tokens=32, eval_num_generations=0)
    srt = SDZeroTrainer(model=model, args=args, train_dataset=load_dataset("json", data_files=str(revisions), split="train"),
                        processing_class=tokenizer, peft_config=LoraConfig(**LORA))
    srt.train()
    scores = held_out_scores(srt)
    # At least one more held-out capital answered than the base model (32 questions: 1/32 = 0.031).
    assert scores[SDZERO_SRT_STEPS] >= scores[0] + 0.03, scores

    merged = srt.model.merge_and_unload()
    args = SDZeroConfig(output_dir=str(tmp_path / "distill"), phase="distill", verifier=verifier, max_steps=8,
                        learning_rate=1e-4, per_device_train_batch_size=4, num_generations=2, max_prompt_length=128,
                        max_completion_length=32, max_teacher_prompt_length=512, lr_scheduler_type="constant_with_warmup",
                        warmup_steps=2, seed=0, logging_steps=1, save_strategy="no", report_to="none", use_cpu=True,
                        eval_prompts=str(DATA / "capitals_heldout.jsonl"), eval_verifier=verifier, eval_max_new_tokens=32,
                        eval_num_generations=0)
    distill = SDZeroTrainer(model=merged, args=args, train_dataset=load_dataset("json", data_files=str(DATA / "capitals_test.jsonl"),
                                                                                split="train"),
                            processing_class=tokenizer, peft_config=LoraConfig(**LORA))
    distill.train()
    after = held_out_scores(distill)
    # Phase 2 keeps what SRT gained: after both phases, still at least one more held-out capital than the base model.
    assert after[0] == pytest.approx(scores[SDZERO_SRT_STEPS]) and after[8] >= scores[0] + 0.03, (scores, after)


@pytest.mark.slow
def test_sdft_with_auto_template_teaches_the_city_tag_and_keeps_the_prior(demo_model_dir, tmp_path):
    """The second demo task, of another kind (sd_plugin.demo_task, "city tag": "Where does Lena live?" and a message
    -> "CITY: CAIRO"), trained with `teacher_template: auto` and the library's defaults otherwise (forward KL,
    temperature 1, base teacher, the teacher check on 8 rows), except the learning rate, the steps, the token caps
    and `num_loss_tokens_to_skip: 0` (the tag's first tokens are the format: README, "Settings that work for small
    models"). The base model answers in a sentence; the teacher check picks a template under which the teacher
    writes the tag on some rows (like_this: 3 of 8), and predicts slow learning, which is what happens: the greedy
    held-out score leaves 0 (benchmarks/README.md, "Teacher templates on two tasks": 0 -> 0.083 after 16 steps,
    0.167 after 32, sampled answers still 0) while the capitals hold. A teacher that writes the tag on 3 rows of 8
    cannot teach it as fast as the contact cards' teacher (8 of 8)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(demo_model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir)
    held_out = tmp_path / "city_test.jsonl"
    held_out.write_text("".join((DATA / "city_test.jsonl").read_text().splitlines(keepends=True)[:24]))
    records = load_dataset("json", data_files=str(DATA / "city_train.jsonl"), split="train")
    steps = 24
    args = SDFTConfig(
        output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=4, learning_rate=1e-3,
        lr_scheduler_type="constant_with_warmup", warmup_steps=2, seed=0, logging_steps=1, save_strategy="no",
        report_to="none", use_cpu=True, max_completion_length=24, max_prompt_length=256, max_teacher_prompt_length=512,
        teacher_template="auto", num_loss_tokens_to_skip=0, eval_prompts=str(held_out),
        eval_verifier="sd_plugin.demo_task:CityTagVerifier", prior_prompts=str(DATA / "capitals_test.jsonl"),
        prior_verifier="sd_plugin.demo_task:AnswerContainsVerifier", eval_max_new_tokens=24, eval_num_generations=0,
    )
    trainer = SDFTTrainer(model=model, args=args, train_dataset=records, processing_class=tokenizer, peft_config=LoraConfig(**LORA))
    chosen = trainer.teacher_check.score(trainer.teacher_template_chosen)
    assert chosen.name != "paper" and chosen.verifier_pass_rate > 0, trainer.teacher_check.table()
    trainer.train()
    scores = {e["step"]: e for e in trainer.state.log_history if "eval_task_reward" in e}
    before, after = scores[0], scores[steps]
    assert before["eval_task_reward"] == 0.0 and before["eval_task_format_rate"] == 0.0, before
    # At least one held-out tag written exactly (24 questions: 1/24 = 0.042).
    assert after["eval_task_reward"] >= 0.04 and after["eval_task_format_rate"] >= 0.04, after
    assert after["eval_prior_reward"] >= before["eval_prior_reward"] - 0.07, (before, after)
