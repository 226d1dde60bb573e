"""benchmarks/gpu_check.py's install step, offline: a real venv, one package that installs and one that does not.

(The dry run itself: tests/test_gpu_check.py.)"""

import base64
import hashlib
import io
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import gpu_check  # noqa: E402


def tiny_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel, built by hand (no network, no build backend)."""
    files = {"tiny_pkg/__init__.py": b"",
             "tiny_pkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: tiny-pkg\nVersion: 1.0\n",
             "tiny_pkg-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()},"
                     f"{len(data)}\n" for name, data in files.items()) + "tiny_pkg-1.0.dist-info/RECORD,,\n"
    path = folder / "tiny_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr("tiny_pkg-1.0.dist-info/RECORD", record)
    return path


def test_install_makes_a_venv_and_reports_each_package_that_fails(tmp_path, monkeypatch):
    wheel = tiny_wheel(tmp_path)
    monkeypatch.setattr(gpu_check, "INSTALLS", [
        ("tiny", ["--no-index", "--no-deps", str(wheel)]),
        ("missing", ["--no-index", "no-such-package-for-gpu-check"]),
    ])
    log = io.StringIO()
    rows = gpu_check.install(tmp_path / "venv", log)
    assert [(row.check, row.status) for row in rows] == [("install tiny", "pass"), ("install missing", "fail")]
    assert "no-such-package-for-gpu-check" in rows[1].note and "ERROR" in rows[1].note
    assert (tmp_path / "venv" / "bin" / "python").exists() and "$ pip install" in log.getvalue()
    assert (tmp_path / "venv" / "constraints.txt").read_text().strip() == gpu_check.TORCH_PIN
