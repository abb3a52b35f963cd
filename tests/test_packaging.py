"""The project installs as a package: a wheel with the console scripts, whose flag checks run in a clean venv
that has none of the dependencies (so they import no TensorFlow)."""

import pathlib
import shutil
import subprocess
import sys
import venv

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SCRIPTS = {"bcs-train": "training.run", "bcs-evaluate": "training.evaluate", "bcs-export": "export",
           "bcs-reproduce": "training.reproduce", "bcs-report": "training.report", "bcs-archive": "training.archive"}

pytestmark = pytest.mark.slow


def test_the_wheel_installs_its_console_scripts_into_a_clean_venv(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    for package in ("bcs_tf", "training", "export", "bench", "bcs_run"):
        shutil.copytree(ROOT / package, src / package, ignore=shutil.ignore_patterns("__pycache__"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    wheel = next((tmp_path / "dist").glob("bcs_tf-*.whl"))
    venv.create(tmp_path / "venv", with_pip=True)
    bin_dir = tmp_path / "venv" / "bin"
    subprocess.run([bin_dir / "pip", "install", "-q", "--no-deps", str(wheel)], check=True, capture_output=True)
    for script, module in SCRIPTS.items():
        help_text = subprocess.run([bin_dir / script, "--help"], capture_output=True, text=True, cwd=tmp_path)
        assert help_text.returncode == 0, (script, help_text.stderr)
        assert f"python -m {module}" in help_text.stdout  # the same command line as python -m …
    bad = subprocess.run([bin_dir / "bcs-train", "--connectivity", "0"], capture_output=True, text=True,
                         cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --connectivity")
