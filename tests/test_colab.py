"""The Colab notebooks in colab/: valid nbformat v4 with cleared outputs, a working SMOKE switch, and each
notebook executed end to end in smoke mode with nbclient (the tiny local model, no Unsloth, no push)."""

import sys
from pathlib import Path

import nbformat
import pytest

REPO = Path(__file__).resolve().parents[1]
COLAB = REPO / "colab"
NOTEBOOKS = sorted(COLAB.glob("*.ipynb"))
# Text each notebook must print in smoke mode: proof that its main steps ran, not just that no cell failed.
KEY_OUTPUTS = {
    "sdft_quickstart": ["loss=", "teacher template chosen by the teacher check: ",
                        "Held-out evaluation: step 0 -> step 4 (greedy; sampled: 1 per prompt",
                        "dry run: would write: ", "saved tensors: BF16 x25",
                        "artifact        max|from disk - base+adapter|", "not pushed: smoke mode"],
    "round2_mixer": ["effective groups", "wrote 400 rows to", "identical to the mix above: True", "AUC (scenario)",
                     "SDFT on the mixed corpus: 400 records, 2 steps"],
    "sdpo_verifier": ["reward_mean=", "feedback_used_fraction=1.000", "loss=", "test accuracy:",
                      "dry run: would write: "],
}
# About 40 s, 25 s and 30 s on 2 CPU cores (the mixer notebook ends by training SDFT on the mixed rows).
SLOW = {"sdft_quickstart", "sdpo_verifier", "round2_mixer"}


def read(path: Path):
    return nbformat.read(str(path), as_version=nbformat.NO_CONVERT)


def tagged_source(path: Path, tag: str) -> str:
    cells = [cell for cell in read(path).cells if tag in cell.metadata.get("tags", [])]
    assert len(cells) == 1, f"{path.name}: expected one cell tagged {tag!r}, found {len(cells)}"
    return cells[0].source


def parameters_source(path: Path) -> str:
    return tagged_source(path, "parameters")


def install_source(path: Path) -> str:
    return tagged_source(path, "install")


def test_every_notebook_is_executed_by_this_file():
    assert {path.stem for path in NOTEBOOKS} == set(KEY_OUTPUTS)


# ------------------------------------------------------------------ the committed files (fast)
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_is_valid_nbformat_v4_with_cleared_outputs(path):
    notebook = read(path)
    assert notebook.nbformat == 4
    nbformat.validate(notebook)
    assert notebook.metadata.kernelspec.name == "python3"
    for index, cell in enumerate(notebook.cells):
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, f"{path.name}: cell {index} has outputs"
    assert path.stat().st_size < 40_000  # small JSON: no embedded plots or logs


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_the_first_code_cell_installs_from_sd_plugin_source_and_installs_are_guarded(path):
    notebook = read(path)
    code_cells = [cell for cell in notebook.cells if cell.cell_type == "code"]
    source = "\n".join(cell.source for cell in code_cells)
    assert code_cells[0].source == install_source(path), f"{path.name}: the install cell is not the first code cell"
    assert 'SD_PLUGIN_SOURCE = os.environ.get("SD_PLUGIN_SOURCE", "")' in install_source(path)
    assert "REPO_URL" not in source and "YOUR-ORG" not in source
    # The markdown before it says what to set and when to restart.
    before = notebook.cells[notebook.cells.index(code_cells[0]) - 1]
    assert before.cell_type == "markdown" and "`SD_PLUGIN_SOURCE`" in before.source
    assert "Runtime > Restart session" in before.source
    assert "!pip" not in source and "%pip" not in source
    install_lines = [line for line in source.splitlines() if "pip_install(" in line and not line.startswith("def ")]
    assert install_lines, f"{path.name}: no install cell"
    # Every install call sits inside `if IN_COLAB:` (and Unsloth additionally inside `if not SMOKE:`).
    assert all(line.startswith("    ") for line in install_lines), install_lines
    install_cell = next(cell.source for cell in notebook.cells if "pip_install(" in cell.source)
    assert "\nif IN_COLAB:\n" in install_cell
    if 'pip_install("unsloth")' in install_cell:
        assert "    if INSTALL_UNSLOTH:\n        pip_install(\"unsloth\")" in install_cell


class FakeColab:
    """The install cell run as in Colab, offline: google.colab present, every subprocess (nvidia-smi, git, pip)
    recorded instead of run, and the installed versions of the watched packages as `versions` says."""

    def __init__(self, monkeypatch, versions_after: dict | None = None):
        import importlib.metadata
        import importlib.util
        import subprocess
        import types

        self.commands, self.installed = [], False
        real_find_spec, real_version = importlib.util.find_spec, importlib.metadata.version
        monkeypatch.setattr(importlib.util, "find_spec",
                            lambda name, *a: object() if name == "google.colab" else real_find_spec(name, *a))

        def version(name):
            if self.installed and versions_after and name in versions_after:
                return versions_after[name]
            return real_version(name)

        def run(command, **kwargs):
            self.commands.append(list(command))
            self.installed = self.installed or "pip" in command
            return types.SimpleNamespace(returncode=1)  # nvidia-smi: no GPU

        monkeypatch.setattr(importlib.metadata, "version", version)
        monkeypatch.setattr(subprocess, "run", run)
        monkeypatch.setenv("SD_PLUGIN_SMOKE", "1")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_in_colab_an_unset_source_is_an_error_naming_sd_plugin_source(path, monkeypatch):
    FakeColab(monkeypatch)
    monkeypatch.delenv("SD_PLUGIN_SOURCE", raising=False)
    with pytest.raises(ValueError, match="set SD_PLUGIN_SOURCE"):
        exec(compile(install_source(path), f"{path.name}:install", "exec"), {})


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_in_colab_a_git_source_is_cloned_and_installed_without_a_restart(path, monkeypatch, capsys):
    if Path("/content/sd-plugin").exists():
        pytest.skip("a real /content/sd-plugin exists here")
    colab = FakeColab(monkeypatch)
    monkeypatch.setenv("SD_PLUGIN_SOURCE", "https://github.com/someone/sd-plugin.git@v0.3")
    exec(compile(install_source(path), f"{path.name}:install", "exec"), {})
    assert ["git", "clone", "--depth", "1", "--branch", "v0.3", "https://github.com/someone/sd-plugin.git",
            "/content/sd-plugin"] in colab.commands
    pip = [command for command in colab.commands if "pip" in command]
    assert pip[-1][-2:] == ["-e", "/content/sd-plugin" + ("" if path.stem == "round2_mixer" else "[hub]")]
    assert not any("unsloth" in command for command in pip)  # smoke mode: no Unsloth
    assert "no restart needed" in capsys.readouterr().out


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_in_colab_replacing_an_imported_package_asks_for_a_restart(path, monkeypatch):
    if Path("/content/sd-plugin").exists():
        pytest.skip("a real /content/sd-plugin exists here")
    import torch  # noqa: F401  (imported in this process, as by an earlier cell)

    FakeColab(monkeypatch, versions_after={"torch": "0.0.1+other"})
    monkeypatch.setenv("SD_PLUGIN_SOURCE", "https://github.com/someone/sd-plugin.git")
    with pytest.raises(SystemExit, match=r"RESTART NEEDED: .*torch.*Runtime > Restart session, then run from the next cell"):
        exec(compile(install_source(path), f"{path.name}:install", "exec"), {})


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
@pytest.mark.parametrize("setting,expected", [("1", True), ("0", False), (None, "no GPU")])
def test_smoke_switch_follows_the_environment(path, setting, expected, monkeypatch):
    """The parameters cell in-process: SD_PLUGIN_SMOKE=0/1 wins; unset, smoke mode is on without a CUDA GPU."""
    if setting is None:
        monkeypatch.delenv("SD_PLUGIN_SMOKE", raising=False)
    else:
        monkeypatch.setenv("SD_PLUGIN_SMOKE", setting)
    namespace = {}
    exec(compile(parameters_source(path), f"{path.name}:parameters", "exec"), namespace)
    if expected == "no GPU":
        assert namespace["SMOKE"] is (not namespace["cuda_gpu_present"]())
    else:
        assert namespace["SMOKE"] is expected
    # The install cell's rule for Unsloth (the GPU path) is the same switch: installed exactly when not SMOKE.
    install = {}
    exec(compile(install_source(path), f"{path.name}:install", "exec"), install)
    if 'pip_install("unsloth")' in install_source(path):
        assert install["INSTALL_UNSLOTH"] is (not namespace["SMOKE"])


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_a_bad_smoke_setting_is_refused(path, monkeypatch):
    monkeypatch.setenv("SD_PLUGIN_SMOKE", "yes")
    with pytest.raises(ValueError, match="SD_PLUGIN_SMOKE must be 0 or 1, got 'yes'"):
        exec(compile(parameters_source(path), f"{path.name}:parameters", "exec"), {})


# ------------------------------------------------------------------ executing them
@pytest.fixture(scope="session")
def kernel_name() -> str:
    """A Jupyter kernel that runs this interpreter (the venv's python), installed into the venv if missing."""
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    # jupyter_client starts a spec whose argv[0] is "python" / "python3" / "python3.X" with sys.executable.
    runs_this_python = {"python", f"python{sys.version_info[0]}", "python{}.{}".format(*sys.version_info[:2])}
    try:
        argv0 = KernelSpecManager().get_kernel_spec("python3").argv[0]
        if argv0 in runs_this_python or Path(argv0).resolve() == Path(sys.executable).resolve():
            return "python3"
    except NoSuchKernel:
        pass
    from ipykernel.kernelspec import install

    install(kernel_name="sd-plugin-venv", display_name="sd-plugin venv", prefix=sys.prefix)
    return "sd-plugin-venv"


def output_text(notebook) -> tuple[str, int, list[str]]:
    """All printed text, the number of images shown, and the errors, over every code cell."""
    texts, images, errors = [], 0, []
    for cell in notebook.cells:
        for output in cell.get("outputs", []):
            if output.output_type == "stream":
                texts.append(output.text)
            elif output.output_type == "error":
                errors.append(f"{output.ename}: {output.evalue}")
            else:
                texts.append(output.get("data", {}).get("text/plain", ""))
                images += "image/png" in output.get("data", {})
    return "\n".join(texts), images, errors


@pytest.mark.parametrize("name", [pytest.param(name, marks=pytest.mark.slow) if name in SLOW else name
                                  for name in KEY_OUTPUTS])
def test_notebook_runs_end_to_end_in_smoke_mode(name, kernel_name, tmp_path, monkeypatch):
    from nbclient import NotebookClient

    for key, value in {"SD_PLUGIN_SMOKE": "1", "SD_PLUGIN_OUTPUT_DIR": str(tmp_path), "HF_HUB_OFFLINE": "1",
                       "TOKENIZERS_PARALLELISM": "false", "AXOLOTL_DO_NOT_TRACK": "1"}.items():
        monkeypatch.setenv(key, value)
    for key in ("HUB_REPO", "HF_TOKEN"):
        monkeypatch.delenv(key, raising=False)
    notebook = read(COLAB / f"{name}.ipynb")
    # cwd colab/, as when the notebook is opened from the checkout; a failing cell raises CellExecutionError.
    NotebookClient(notebook, timeout=600, kernel_name=kernel_name,
                   resources={"metadata": {"path": str(COLAB)}}).execute()

    text, images, errors = output_text(notebook)
    assert errors == []
    assert "not in Colab: nothing installed" in text
    assert "SMOKE=True IN_COLAB=False" in text and f"repository: {REPO}" in text
    for expected in KEY_OUTPUTS[name]:
        assert expected in text, f"{name}: {expected!r} not in the output"
    assert images >= 1  # the metric plots
    assert any(tmp_path.iterdir())  # outputs went to SD_PLUGIN_OUTPUT_DIR, not into the checkout
