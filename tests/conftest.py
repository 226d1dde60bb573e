import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("AXOLOTL_DO_NOT_TRACK", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "example_configs" / "assets"


def pytest_configure(config):
    """One share of the cores per xdist worker, for the worker and every process it starts (axolotl train, torchrun):
    two workers with two OpenMP threads each on a 2-core machine spin against each other, and a real-model test ran
    8x slower than with one thread each (118 s vs 15 s for the same generate + backward, measured side by side).
    (xdist names the worker count in `config.workerinput`, not yet in the environment when this file is imported.)"""
    workers = getattr(config, "workerinput", {}).get("workercount")
    if workers is None and getattr(config.option, "numprocesses", None):
        return  # the xdist controller: its workers inherit its environment and set their own share
    threads = os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // (workers or 1))))
    torch.set_num_threads(int(threads))


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
