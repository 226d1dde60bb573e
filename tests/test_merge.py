"""Merge, model card and push (sd_plugin.merge, sd_plugin.model_card).

One real SDFT-trained LoRA adapter on the tiny local Qwen3 (2 steps) is merged once and reused. Nothing
here contacts the Hub: pushes go to a recording fake of HfApi, dry runs and token checks run with the
network and HfApi blocked.
"""

import json
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from sd_plugin import hub as hub_module
from sd_plugin import merge as merge_module
from sd_plugin import merge_check
from sd_plugin.axolotl.merge_hook import post_lora_merge
from sd_plugin.cli import main as cli_main
from sd_plugin.merge import PublishError, merge_adapter, package_adapter

ASSETS = Path(__file__).resolve().parents[1] / "example_configs" / "assets"
BASE = ASSETS / "tiny-qwen3"
LEARNING_RATE = 0.0123   # distinctive values the model card must show
DISTILLATION_ALPHA = 0.37
LORA_R = 6
# Short SDFT records keep the two training steps fast on CPU.
SDFT_ROWS = [
    {"prompt": [{"role": "user", "content": question}], "demonstration": answer}
    for question, answer in [
        ("What is the molar mass of water?", "About 18.02 g/mol: 2 x 1.008 + 16.00."),
        ("Name the noble gas in period 2.", "Neon (Ne), atomic number 10."),
        ("Is NaCl ionic or covalent?", "Ionic: Na+ and Cl- ions."),
        ("What is the pH of pure water at 25 C?", "7, since [H+] = [OH-] = 1e-7 M."),
    ]
]


class FakeHfApi:
    """Records create_repo / create_commit; `failures` are raised by the first create_commit calls."""

    def __init__(self, failures=()):
        self.calls = []
        self.failures = list(failures)

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", repo_id, kwargs))
        return f"https://huggingface.co/{repo_id}"

    def create_commit(self, repo_id, operations, **kwargs):
        self.calls.append(("create_commit", repo_id, sorted(op.path_in_repo for op in operations), kwargs))
        if self.failures:
            raise self.failures.pop(0)
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0123abcd")

    def commits(self):
        return [call for call in self.calls if call[0] == "create_commit"]


def http_error(status: int):
    import httpx
    from huggingface_hub.errors import HfHubHTTPError

    request = httpx.Request("POST", "https://huggingface.co/api/models/me/x/commit/main")
    return HfHubHTTPError(f"{status} error", response=httpx.Response(status, request=request))


@pytest.fixture
def no_token(monkeypatch):
    import huggingface_hub

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)


@pytest.fixture
def no_network(monkeypatch):
    """Any socket connection or HfApi construction fails the test."""
    import huggingface_hub

    def refuse(*args, **kwargs):
        raise AssertionError("network or HfApi used")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(huggingface_hub, "HfApi", refuse)
    monkeypatch.setattr(merge_check, "load_model_float32", refuse)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA adapter trained 2 SDFT steps on tiny-qwen3, its trainer_state.json and trainer arguments."""
    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sd_plugin import SDFTConfig, SDFTTrainer

    root = tmp_path_factory.mktemp("trained")
    tokenizer = AutoTokenizer.from_pretrained(BASE)
    model = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    args = SDFTConfig(output_dir=str(root / "run"), max_steps=2, per_device_train_batch_size=2, max_completion_length=8,
                      learning_rate=LEARNING_RATE, distillation_alpha=DISTILLATION_ALPHA, logging_steps=1,
                      save_strategy="no", report_to="none", seed=0)
    trainer = SDFTTrainer(model=model, args=args, train_dataset=Dataset.from_list(SDFT_ROWS),
                          processing_class=tokenizer,
                          peft_config=LoraConfig(r=LORA_R, lora_alpha=2 * LORA_R, target_modules=["q_proj", "v_proj"],
                                                 task_type="CAUSAL_LM"))
    trainer.train()
    adapter_dir = root / "adapter"
    # save_model also writes the config actually used and the logged metrics, where `sd-plugin merge` looks.
    trainer.save_model(str(adapter_dir))
    assert json.loads((adapter_dir / "training_config.json").read_text())["learning_rate"] == LEARNING_RATE
    return SimpleNamespace(adapter=adapter_dir, trainer_state=adapter_dir / "trainer_state.json", root=root)


@pytest.fixture(scope="module")
def merged(trained):
    """The adapter merged to bf16 and pushed to a fake Hub."""
    api = FakeHfApi()
    out = trained.root / "merged"
    report = merge_adapter(str(BASE), trained.adapter, out, metrics=trained.trainer_state, datasets=["my-org/chem-sdft"],
                           base_model_id="Qwen/Qwen3-0.6B", push_to_hub="me/tiny-sdft", token="hf_test", api=api,
                           log=lambda message: None)
    return SimpleNamespace(report=report, out=out, api=api)


def reference_logits(adapter_dir, input_ids):
    """Base + adapter in float32, computed independently of sd_plugin.merge."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32)
    model = PeftModel.from_pretrained(base, str(adapter_dir)).eval()
    with torch.no_grad():
        with_adapter = model(input_ids=input_ids).logits
        with model.disable_adapter():
            without_adapter = model(input_ids=input_ids).logits
    return with_adapter, without_adapter


# ------------------------------------------------------------------------------------ merge round trip
def test_merged_model_matches_base_plus_adapter_in_bf16(trained, merged):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(merged.out)
    assert tokenizer.chat_template == AutoTokenizer.from_pretrained(BASE).chat_template
    for name in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (merged.out / name).is_file(), name

    # Every tensor on disk is bf16 (read from the safetensors files, not through transformers).
    dtypes = {}
    for path in merged.out.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            dtypes.update({key: handle.get_slice(key).get_dtype() for key in handle.keys()})
    assert dtypes and set(dtypes.values()) == {"BF16"}
    assert not [key for key in dtypes if "lora" in key]
    assert json.loads((merged.out / "config.json").read_text())["dtype"] == "bfloat16"

    # Reloaded in bf16, compared in float32 with base + adapter computed here.
    messages = [{"role": "user", "content": "What is the molar mass of water?"}]
    input_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]
    model = AutoModelForCausalLM.from_pretrained(merged.out, dtype=torch.bfloat16)
    assert model.dtype == torch.bfloat16
    with torch.no_grad():
        merged_logits = model.float()(input_ids=input_ids).logits
    with_adapter, without_adapter = reference_logits(trained.adapter, input_ids)
    difference = float((merged_logits - with_adapter).abs().max())
    adapter_effect = float((with_adapter - without_adapter).abs().max())
    report = merged.report
    assert difference <= report.tolerance
    assert adapter_effect > 10 * difference, "the trained adapter must move logits well beyond bf16 rounding"
    assert report.max_abs_logit_diff <= report.tolerance
    assert report.float32_merge_diff < 1e-4 and report.save_reload_diff == 0.0
    assert report.tensor_dtypes == {"BF16": len(dtypes)}
    print(f"\nmax |logit diff| here {difference:.3e}; report {report.max_abs_logit_diff:.3e}; "
          f"tolerance {report.tolerance:.3e}; adapter effect {adapter_effect:.3e}")


def test_merge_pushes_one_commit(merged):
    assert [call[0] for call in merged.api.calls] == ["create_repo", "create_commit"]
    _, repo_id, paths, kwargs = merged.api.commits()[0]
    assert repo_id == "me/tiny-sdft"
    assert {"model.safetensors", "config.json", "README.md", "tokenizer.json", "chat_template.jinja"} <= set(paths)
    assert paths == sorted(name for name, _ in merged.report.files)
    assert merged.report.commit_url.endswith("/commit/0123abcd")


# ------------------------------------------------------------------------------------ model card
def test_model_card_shows_the_configuration_actually_used(trained, merged):
    from huggingface_hub import ModelCard

    text = (merged.out / "README.md").read_text()
    card = ModelCard(text)
    assert card.data.base_model == "Qwen/Qwen3-0.6B"
    assert card.data.library_name == "transformers"
    assert {"sdft", "self-distillation", "lora"} <= set(card.data.tags)
    assert card.data.datasets == ["my-org/chem-sdft"]
    assert f"| `learning_rate` | {LEARNING_RATE} |" in text
    assert f"| `distillation_alpha` | {DISTILLATION_ALPHA} |" in text
    assert f"| `r` | {LORA_R} |" in text and f"| `lora_alpha` | {2 * LORA_R} |" in text
    assert "| `max_completion_length` | 8 |" in text
    state = json.loads(trained.trainer_state.read_text())
    final_loss = [entry for entry in state["log_history"] if "loss" in entry][-1]["loss"]
    assert f"{final_loss:.4g} (step 2)" in text
    assert "`loss`" in text and "`completions/mean_length`" in text
    assert "arXiv:2601.19897" in text and "Shenfeld" in text
    assert "Merge check: max |logit difference|" in text
    assert 'AutoModelForCausalLM.from_pretrained(model_id, dtype=torch.bfloat16' in text and '"me/tiny-sdft"' in text


def test_adapter_card_from_axolotl_config_with_eval_stats(tmp_path):
    from huggingface_hub import ModelCard

    from sd_plugin.model_card import write_model_card

    config = {
        "base_model": "Qwen/Qwen3-8B", "adapter": "qlora", "load_in_4bit": True, "learning_rate": 2.5e-05,
        "micro_batch_size": 1, "gradient_accumulation_steps": 8, "lora_r": 16, "lora_alpha": 32,
        "datasets": [{"path": "my-org/chemistry", "type": "sd_plugin.prompt_strategies.sdpo"}, {"path": "data/local.jsonl"}],
        "sdpo": {"distillation_alpha": 0.5, "distillation_topk": 100, "teacher_model_kind": "ema", "teacher_update_rate": 0.05},
    }
    eval_stats = {"stages": {
        "base": {"n_generations": 200, "n_good": 25, "n_bad": 25, "mean_R": 0.208, "good_mean": 0.205, "bad_mean": 0.21,
                 "auc": 0.478, "ci": {"mean_R": [0.18, 0.23]}},
        "sdpo": {"n_generations": 200, "n_good": 25, "n_bad": 25, "mean_R": 0.318, "good_mean": 0.309, "bad_mean": 0.327,
                 "auc": 0.475, "ci": {"mean_R": [0.29, 0.35]}},
    }, "settings": {"bootstrap": 1000, "seed": 0}}
    metrics = {"log_history": [{"loss": 0.9, "kl": 0.5, "step": 1}, {"loss": 0.2, "kl": 0.1, "step": 40},
                               {"train_loss": 0.4, "train_runtime": 120.0, "step": 40}]}
    path = write_model_card(tmp_path, method="sdpo", base_model="Qwen/Qwen3-8B", training_config=config, metrics=metrics,
                            eval_stats=eval_stats, adapter_only=True, repo_id="me/qwen3-sdpo-lora")
    text = path.read_text()
    card = ModelCard(text)
    assert card.data.library_name == "peft"
    assert card.data.datasets == ["my-org/chemistry"]  # the local file is listed in the text only
    assert {"sdpo", "qlora"} <= set(card.data.tags)
    assert "- data/local.jsonl" in text
    assert "### SDPO options (`sdpo:` block)" in text and "| `distillation_topk` | 100 |" in text
    assert "| `learning_rate` | 2.5e-05 |" in text and "| `lora_r` | 16 |" in text
    assert "| sdpo | 200 | 25 | 25 | 0.318 [0.290, 0.350] |" in text
    assert "| `loss` | 0.9 (step 1) | 0.2 (step 40) |" in text
    assert "arXiv:2601.20802" in text and 'PeftModel.from_pretrained(base, "me/qwen3-sdpo-lora")' in text


# ------------------------------------------------------------------------------------ token, dry run, push
def test_push_without_token_fails_before_merging(trained, tmp_path, no_token, no_network, capsys):
    out = tmp_path / "never"
    code = cli_main(["merge", "--base", str(BASE), "--adapter", str(trained.adapter), "--out", str(out),
                     "--push-to-hub", "me/tiny-sdft"])
    assert code == 2
    error = capsys.readouterr().err
    assert "needs a Hugging Face token" in error and "HF_TOKEN" in error and "Nothing was merged" in error
    assert not out.exists()


def test_dry_run_lists_files_and_touches_nothing(trained, merged, tmp_path, no_network, monkeypatch, capsys):
    import huggingface_hub

    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr(huggingface_hub.constants, "is_offline_mode", lambda: False)
    out = tmp_path / "planned"
    code = merge_module.main(["--adapter", str(trained.adapter), "--base", str(BASE), "--out", str(out),
                              "--push-to-hub", "me/tiny-sdft", "--private", "--dry-run"])
    printed = capsys.readouterr().out
    assert code == 0, printed
    assert "push to me/tiny-sdft (private) in one commit" in printed
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja", "README.md"):
        assert name in printed
    # Estimated from the base's safetensors headers: 2 bytes per weight, within 2% of what the merge wrote.
    estimate_kb = float(printed.split(" KB  model.safetensors")[0].rsplit("~", 1)[1])
    assert estimate_kb * 1024 == pytest.approx((merged.out / "model.safetensors").stat().st_size, rel=0.02)
    assert "token: HF_TOKEN" in printed and "nothing was merged, written or sent" in printed
    assert not out.exists()

    code = merge_module.main(["--adapter", str(trained.adapter), "--out", str(out), "--adapter-only", "--dry-run",
                              "--push-to-hub", "me/tiny-sdft-lora"])
    printed = capsys.readouterr().out
    assert code == 0 and "adapter_model.safetensors" in printed and "adapter_config.json" in printed
    assert "training_args.bin" not in printed and not out.exists()


def test_adapter_push_retries_transient_errors_in_one_commit(trained, tmp_path, monkeypatch):
    monkeypatch.setattr(hub_module.time, "sleep", lambda seconds: None)
    api = FakeHfApi(failures=[http_error(503), ConnectionError("connection reset")])
    out = tmp_path / "adapter_repo"
    report = package_adapter(trained.adapter, out, base_model_id="Qwen/Qwen3-0.6B", push_to_hub="me/tiny-sdft-lora",
                             private=True, token="hf_test", api=api, log=lambda message: None)
    commits = api.commits()
    assert len(commits) == 3  # two transient failures, then the one commit
    assert all(call[2] == commits[0][2] for call in commits)
    assert commits[0][2] == ["README.md", "adapter_config.json", "adapter_model.safetensors", "chat_template.jinja",
                             "tokenizer.json", "tokenizer_config.json"]
    assert api.calls[0] == ("create_repo", "me/tiny-sdft-lora", {"private": True, "exist_ok": True, "repo_type": "model"})
    assert report.commit_url.endswith("0123abcd")
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == "Qwen/Qwen3-0.6B"
    assert "PeftModel.from_pretrained" in (out / "README.md").read_text()

    # A permanent error (bad token) is not retried.
    api = FakeHfApi(failures=[http_error(401)])
    with pytest.raises(merge_module.PushError, match="401 error.*hf upload me/tiny-sdft-lora"):
        merge_module.push_folder(out, "me/tiny-sdft-lora", token="hf_test", api=api, log=lambda message: None)
    assert len(api.commits()) == 1


# ------------------------------------------------------------------------------------ 4-bit, failures, Axolotl hook
def test_qlora_adapter_merges_into_16bit_unless_asked(trained, merged, tmp_path):
    from safetensors.torch import load_file

    qlora_config = {"adapter": "qlora", "load_in_4bit": True, "learning_rate": LEARNING_RATE,
                    "sdft": {"distillation_alpha": DISTILLATION_ALPHA}}
    report = merge_adapter(str(BASE), trained.adapter, tmp_path / "nf4", training_config=qlora_config, dequantize_4bit=True)
    assert report.trained_in_4bit and "adapter: qlora" in report.trained_in_4bit_evidence
    assert "4-bit round trip" in report.base_weights and "nf4" in report.base_weights
    assert report.max_abs_logit_diff <= report.tolerance
    nf4 = load_file(str(tmp_path / "nf4" / "model.safetensors"))
    original = load_file(str(merged.out / "model.safetensors"))
    key = "model.layers.0.mlp.down_proj.weight"
    assert not torch.equal(nf4[key], original[key])  # merged into different base weights
    assert "Merged into: the 4-bit round trip" in (tmp_path / "nf4" / "README.md").read_text()
    assert merged.report.base_weights.startswith("the original float32 checkpoint")


def test_qlora_plan_names_the_base_weights(trained, tmp_path, no_network):
    qlora_config = {"adapter": "qlora", "load_in_4bit": True, "sdft": {"distillation_alpha": DISTILLATION_ALPHA}}
    plan = merge_module.plan_publish(str(BASE), trained.adapter, tmp_path / "out", training_config=qlora_config)
    assert "adapter trained in 4-bit: training config: adapter: qlora; merging into the original 16-bit weights" in plan.format()
    plan = merge_module.plan_publish(str(BASE), trained.adapter, tmp_path / "out", training_config=qlora_config,
                                     dequantize_4bit=True)
    assert "merging into the dequantized 4-bit weights (--dequantize-4bit)" in plan.format()
    assert not (tmp_path / "out").exists()


def test_prequantized_base_is_refused_before_writing(trained, tmp_path):
    import shutil

    fake_base = tmp_path / "base-bnb-4bit"
    shutil.copytree(BASE, fake_base)
    config = json.loads((fake_base / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    (fake_base / "config.json").write_text(json.dumps(config))
    with pytest.raises(PublishError, match="original 16-bit checkpoint"):
        merge_adapter(str(fake_base), trained.adapter, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_failed_check_exits_nonzero_and_pushes_nothing(trained, tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setenv("HF_TOKEN", "hf_test")
    monkeypatch.setattr(huggingface_hub.constants, "is_offline_mode", lambda: False)
    api = FakeHfApi()
    monkeypatch.setattr(merge_module, "push_folder", lambda *args, **kwargs: api.create_commit("x", []))
    code = merge_module.main(["--base", str(BASE), "--adapter", str(trained.adapter), "--out", str(tmp_path / "out"),
                              "--tolerance", "1e-9", "--push-to-hub", "me/tiny-sdft"])
    error = capsys.readouterr().err
    assert code == 1
    assert "above the tolerance 1e-09" in error and "nothing was pushed" in error
    assert api.calls == []


def test_post_lora_merge_casts_checks_and_writes_card(trained, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # What `axolotl merge-lora` leaves for a float32 base: a float32 merged checkpoint in output_dir/merged.
    output = tmp_path / "merged"
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32), str(trained.adapter))
    model.merge_and_unload().save_pretrained(output)
    AutoTokenizer.from_pretrained(BASE).save_pretrained(output)
    cfg = {"base_model": str(BASE), "adapter": "lora", "learning_rate": LEARNING_RATE, "lora_r": LORA_R,
           "sdft": {"distillation_alpha": DISTILLATION_ALPHA, "teacher_model_kind": "ema"}, "datasets": [{"path": "my-org/chem"}]}
    api = FakeHfApi()
    report = post_lora_merge(cfg, trained.adapter, output, verify=True, push_to_hub="me/axolotl-sdft", token="hf_test",
                             api=api, log=lambda message: None)
    assert report.tensor_dtypes == {"BF16": 25} and "cast 25 floating tensors" in report.notes[0]
    assert report.max_abs_logit_diff <= report.tolerance
    text = (output / "README.md").read_text()
    assert "### SDFT options (`sdft:` block)" in text and f"| `distillation_alpha` | {DISTILLATION_ALPHA} |" in text
    assert len(api.commits()) == 1

    with pytest.raises(PublishError, match="training method"):
        post_lora_merge({"base_model": str(BASE)}, trained.adapter, output)


class LocalHub:
    """A minimal stand-in for the Hub's HTTP API (create repo, validate README, preupload, commit) on 127.0.0.1.

    Every file is answered "regular" (inline base64 in the commit), so the real `HfApi` client runs unchanged.
    `failing_commits` commit requests are answered 503 first.
    """

    def __init__(self, failing_commits: int = 0):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        hub = self
        self.requests, self.commits, self.failing_commits = [], [], failing_commits

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                hub.requests.append(self.path)
                if self.path == "/api/repos/create":
                    return self.answer(200, {"url": f"{hub.url}/{json.loads(body)['name']}"})
                if self.path == "/api/validate-yaml":
                    return self.answer(200, {})
                if "/preupload/" in self.path:
                    files = json.loads(body)["files"]
                    return self.answer(200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]})
                if "/commit/" in self.path:
                    if hub.failing_commits:
                        hub.failing_commits -= 1
                        return self.answer(503, {"error": "Service Unavailable"})
                    hub.commits.append([json.loads(line) for line in body.splitlines() if line.strip()])
                    return self.answer(200, {"commitUrl": f"{hub.url}/me/model/commit/abc", "commitOid": "abc", "success": True})
                return self.answer(404, {"error": f"unexpected {self.path}"})

            def answer(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_push_through_the_real_client_to_a_local_hub(tmp_path, monkeypatch):
    import base64

    import huggingface_hub.constants
    from huggingface_hub import HfApi
    from safetensors.torch import save_file

    from sd_plugin.model_card import write_model_card

    monkeypatch.setattr(huggingface_hub.constants, "is_offline_mode", lambda: False)
    monkeypatch.setattr(hub_module.time, "sleep", lambda seconds: None)
    for variable in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(variable, raising=False)
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"weight": torch.ones(4, 4, dtype=torch.bfloat16)}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text('{"model_type": "qwen3"}')
    write_model_card(folder, method="sdzero", base_model="Qwen/Qwen3-0.6B", training_config={"sdzero": {"distillation_topk": 64}})
    hub = LocalHub(failing_commits=1)
    try:
        commit = merge_module.push_folder(folder, "me/model", token="hf_test", api=HfApi(endpoint=hub.url, token="hf_test"),
                                          retries=2, backoff_seconds=0, log=lambda message: None)
    finally:
        hub.close()
    assert commit.commit_url.endswith("/commit/abc")
    assert len(hub.commits) == 1 and sum("/commit/" in path for path in hub.requests) == 2  # one 503, one commit
    header, *files = hub.commits[0]
    assert header["key"] == "header"
    sent = {item["value"]["path"]: base64.b64decode(item["value"]["content"]) for item in files}
    assert sent == {name: (folder / name).read_bytes() for name in ("README.md", "config.json", "model.safetensors")}
    assert "arXiv:2604.12002" in sent["README.md"].decode()


# ------------------------------------------------------------------------------------ inputs and outputs are safe
@pytest.mark.parametrize("offline,token,match", [
    (True, "hf_test", "HF_HUB_OFFLINE is set"),
    (False, None, "needs a Hugging Face token"),
])
def test_dry_run_checks_what_the_push_checks(trained, tmp_path, no_network, monkeypatch, capsys, offline, token, match):
    """A dry run that passes is a run that pushes: offline mode and a missing token fail it as they fail the push."""
    import huggingface_hub

    monkeypatch.setattr(huggingface_hub.constants, "is_offline_mode", lambda: offline)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(huggingface_hub, "get_token", lambda: None)
    if token:
        monkeypatch.setenv("HF_TOKEN", token)
    out = tmp_path / "planned"
    code = cli_main(["merge", "--base", str(BASE), "--adapter", str(trained.adapter), "--out", str(out),
                     "--push-to-hub", "me/tiny-sdft", "--dry-run"])
    assert code == 2 and match in capsys.readouterr().err and not out.exists()


def test_dry_run_refuses_a_repository_that_is_not_a_repo_id(trained, tmp_path, no_network, capsys):
    code = cli_main(["merge", "--adapter", str(trained.adapter), "--base", str(BASE), "--out", str(tmp_path / "out"),
                     "--dry-run", "--push-to-hub", "not a repo"])
    captured = capsys.readouterr()
    assert code == 2 and captured.out == ""
    assert captured.err.count("\n") == 1 and "'not a repo'" in captured.err and captured.err.startswith("sd-plugin merge: ")


@pytest.mark.parametrize("option", ["--config", "--tokenizer", "--trainer-state"])
def test_overwrite_refuses_an_input_inside_the_output_folder(trained, tmp_path, no_network, capsys, option):
    import shutil

    out = tmp_path / "out"
    out.mkdir()
    inputs = {"--config": out / "training_config.json", "--trainer-state": out / "trainer_state.json",
              "--tokenizer": out / "tokenizer"}
    shutil.copy(trained.adapter / "training_config.json", inputs["--config"])
    shutil.copy(trained.trainer_state, inputs["--trainer-state"])
    shutil.copytree(BASE, inputs["--tokenizer"])
    code = cli_main(["merge", "--adapter", str(trained.adapter), "--base", str(BASE), "--out", str(out), "--overwrite",
                     option, str(inputs[option])])
    error = capsys.readouterr().err
    assert code == 2 and f"{option} {inputs[option]} is inside --out" in error
    assert inputs["--config"].is_file() and inputs["--trainer-state"].is_file() and (inputs["--tokenizer"] / "tokenizer.json").is_file()


def test_overwrite_keeps_the_old_output_when_the_merge_fails(trained, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("previous output")
    code = cli_main(["merge", "--base", str(BASE), "--adapter", str(trained.adapter), "--out", str(out), "--overwrite",
                     "--tolerance", "1e-9"])
    error = capsys.readouterr().err
    assert code == 1 and f"--out {out} is unchanged" in error
    assert [path.name for path in out.iterdir()] == ["old.txt"]


def test_overwrite_through_a_symlinked_out_replaces_its_target(trained, tmp_path):
    target = tmp_path / "real"
    target.mkdir()
    (target / "old.txt").write_text("previous output")
    link = tmp_path / "link"
    link.symlink_to(target, target_is_directory=True)
    report = package_adapter(trained.adapter, link, overwrite=True, method="sdft")
    assert link.is_symlink() and link.resolve() == target.resolve()
    assert not (target / "old.txt").exists() and (target / "adapter_model.safetensors").is_file()
    assert report.card == str(link / "README.md") and (link / "README.md").is_file()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["link", "real"]  # no staging folders left behind


# ------------------------------------------------------------------------------------ shard by shard
def adapter_with_every_kind(folder, base):
    """LoRA on Linear layers (rsLoRA, a rank_pattern) and on the embedding, plus lm_head in modules_to_save; B random."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"],
                        modules_to_save=["lm_head"], use_rslora=True, rank_pattern={"down_proj": 2}, task_type="CAUSAL_LM")
    model = get_peft_model(model, config)
    torch.manual_seed(0)
    for name, parameter in model.named_parameters():
        if "lora_B" in name or "lora_embedding_B" in name:
            parameter.data.normal_(0, 0.05)
        if "modules_to_save" in name:
            parameter.data.add_(torch.randn_like(parameter) * 0.05)
    model.save_pretrained(folder)
    return folder


def test_shard_merge_equals_peft_merge_and_unload_tensor_for_tensor(tmp_path, monkeypatch):
    import safetensors.torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    sharded = tmp_path / "base-sharded"
    AutoModelForCausalLM.from_pretrained(BASE, dtype=torch.float32).save_pretrained(sharded, max_shard_size="100KB")
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"):
        if (BASE / name).is_file():
            (sharded / name).write_bytes((BASE / name).read_bytes())
    assert len(list(sharded.glob("*.safetensors"))) > 3
    adapter = adapter_with_every_kind(tmp_path / "adapter", sharded)

    written = []  # (bytes, tensors) of each output shard, as it is written
    save_file = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file", lambda tensors, path, metadata=None: (
        written.append((sum(t.numel() * t.element_size() for t in tensors.values()), len(tensors))),
        save_file(tensors, path, metadata=metadata)))
    report = merge_adapter(str(sharded), adapter, tmp_path / "out", max_shard_size="200KB", verify_layers=1, method="sdft")
    monkeypatch.undo()

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(sharded, dtype=torch.float32), str(adapter))
    expected = {key: value.to(torch.bfloat16) for key, value in peft_model.merge_and_unload().state_dict().items()}
    merged = {}
    for path in (tmp_path / "out").glob("*.safetensors"):
        merged.update(load_file(str(path)))
    assert set(merged) == set(expected)
    assert [key for key in merged if not torch.equal(merged[key], expected[key])] == []
    # Output shards of at most --max-shard-size (a tensor larger than that alone in its file), with an index.
    assert len(written) > 1 and all(size <= 200_000 or tensors == 1 for size, tensors in written)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(merged)
    assert report.checked_layers == ", first 1 of 2 layers" and report.max_abs_logit_diff <= report.tolerance
    assert report.float32_merge_diff < 1e-4 and report.save_reload_diff == 0.0
    assert "first 1 of 2 layers" in (tmp_path / "out" / "README.md").read_text()


def test_dry_run_prints_the_expected_peak_memory(trained, tmp_path, no_network, capsys):
    code = cli_main(["merge", "--adapter", str(trained.adapter), "--base", str(BASE), "--out", str(tmp_path / "out"),
                     "--dry-run", "--max-shard-size", "100KB"])
    printed = capsys.readouterr().out
    assert code == 0
    line = next(line for line in printed.splitlines() if line.startswith("expected peak memory: merge ~"))
    assert "largest base shard" in line and "largest output shard" in line and "logits check ~" in line
    assert "model-00001-of-" in printed and not (tmp_path / "out").exists()


def test_adapters_the_shard_merge_cannot_apply_are_refused_before_writing(trained, tmp_path):
    import shutil

    dora = tmp_path / "dora"
    shutil.copytree(trained.adapter, dora)
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(dict(config, use_dora=True)))
    with pytest.raises(PublishError, match="DoRA adapters are not supported"):
        merge_adapter(str(BASE), dora, tmp_path / "out")
    assert sorted(path.name for path in tmp_path.iterdir()) == ["dora"]

    from safetensors.torch import load_file, save_file

    foreign = tmp_path / "foreign"
    shutil.copytree(trained.adapter, foreign)
    tensors = load_file(str(foreign / "adapter_model.safetensors"))
    tensors = {key.replace("q_proj", "query_key_value"): value for key, value in tensors.items()}
    save_file(tensors, str(foreign / "adapter_model.safetensors"))
    with pytest.raises(PublishError, match="does not fit this base.*query_key_value"):
        merge_adapter(str(BASE), foreign, tmp_path / "out")
    assert not (tmp_path / "out").exists()



def test_logits_check_is_skipped_and_the_card_says_so_when_it_cannot_fit(trained, tmp_path, monkeypatch):
    from sd_plugin import shards

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(shards, "available_memory", lambda: 1024)
    monkeypatch.setattr(merge_check, "load_model_float32", refuse)
    report = merge_adapter(str(BASE), trained.adapter, tmp_path / "out", method="sdft")
    assert report.max_abs_logit_diff is None and report.check_skipped.startswith("the logits check is skipped: even 2 layers")
    assert "Merge check: not run: the logits check is skipped" in (tmp_path / "out" / "README.md").read_text()
    assert report.tensor_dtypes == {"BF16": 25}

@pytest.mark.slow
def test_merge_peak_memory_follows_the_largest_shard_not_the_model(tmp_path):
    """The same random Llama-shaped model (~21M parameters) in 5 MB shards and in one file: the merge of the
    sharded copy peaks lower by about two copies of the difference (input pages + output buffer)."""
    import re
    import subprocess
    import sys

    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=512, intermediate_size=1408, num_hidden_layers=4, num_attention_heads=8,
                         num_key_value_heads=4, vocab_size=8000, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    tokenizer = AutoTokenizer.from_pretrained(BASE)
    for name, size in (("sharded", "5MB"), ("single", "1GB")):
        model.save_pretrained(tmp_path / name, max_shard_size=size)
        tokenizer.save_pretrained(tmp_path / name)
    lora = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear", task_type="CAUSAL_LM"))
    lora.save_pretrained(tmp_path / "adapter")
    del model, lora

    def peak(name, shard_size):
        result = subprocess.run([sys.executable, "-m", "sd_plugin.cli", "merge", "--base", str(tmp_path / name),
                                 "--adapter", str(tmp_path / "adapter"), "--out", str(tmp_path / f"out-{name}"),
                                 "--verify-layers", "0", "--max-shard-size", shard_size],
                                capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-3000:]
        value, unit = re.search(r"peak memory \(this process\): ([\d.]+) (KB|MB|GB)", result.stdout).groups()
        return float(value) * {"KB": 2**10, "MB": 2**20, "GB": 2**30}[unit]

    model_bytes = sum(path.stat().st_size for path in (tmp_path / "single").glob("*.safetensors"))
    largest_shard = max(path.stat().st_size for path in (tmp_path / "sharded").glob("*.safetensors"))
    difference = peak("single", "1GB") - peak("sharded", "5MB")
    assert difference > 0.5 * (model_bytes - largest_shard), (difference, model_bytes, largest_shard)
