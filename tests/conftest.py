import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "example_configs" / "assets"
torch.set_num_threads(min(2, os.cpu_count() or 1))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(ASSETS / "tiny-qwen3")


@pytest.fixture(scope="session")
def quickstart_rows():
    from sd_plugin.testing import read_jsonl

    return read_jsonl(ASSETS / "data" / "quickstart_sdft.jsonl")


@pytest.fixture(scope="session")
def demo_model_dir(pytestconfig):
    """The real demo model (`sd-plugin demo-model`), built once into the pytest cache and shared by all tests.

    Built into a private directory and renamed into place, so that two xdist workers never see half of it.
    """
    from sd_plugin.demo_model import build_demo_model

    target = Path(pytestconfig.cache.mkdir("sd-plugin")) / "demo-model"
    if not (target / "demo_model.json").is_file():
        private = target.with_name(f"demo-model.building-{os.getpid()}")
        build_demo_model(private, force=True, log=lambda message: None)
        try:
            os.rename(private, target)
        except OSError:  # another worker finished first: use its copy
            import shutil

            shutil.rmtree(private, ignore_errors=True)
    return target
