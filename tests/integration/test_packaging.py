"""A wheel (what `pip install .` builds) carries the Hydra configs: `python -m repro` works from it.

Built offline from a copy of the source tree (no build/ or egg-info left in the checkout), installed
with `pip install --target`, run from a directory outside the repository so that nothing can come
from the source tree.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def run(command: list[str], cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    completed = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, f"{' '.join(command)} failed:\n{completed.stdout}\n{completed.stderr}"
    return completed


def test_wheel_install_composes_experiments_without_the_source_tree(tmp_path: Path) -> None:
    source = tmp_path / "source"
    source.mkdir()
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (REPO / name).exists():
            shutil.copy2(REPO / name, source / name)
    skip = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info")
    shutil.copytree(REPO / "repro", source / "repro", symlinks=True, ignore=skip)
    shutil.copytree(REPO / "conf", source / "conf", ignore=skip)

    wheels = tmp_path / "wheels"
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q",
         "-w", str(wheels), str(source)], cwd=tmp_path)
    (wheel,) = wheels.glob("repro-*.whl")
    target = tmp_path / "site"
    run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-index", "-q", "--target", str(target),
         str(wheel)], cwd=tmp_path)
    assert (target / "repro" / "conf" / "config.yaml").is_file()
    assert not (target / "repro" / "conf").is_symlink()  # real files in the wheel, not a link to conf/

    outside = tmp_path / "elsewhere"
    outside.mkdir()
    env = dict(os.environ, PYTHONPATH=str(target), HYDRA_FULL_ERROR="1")
    located = run([sys.executable, "-c", "import repro.config as c; print(c.__file__); print(c.CONF_DIR)"],
                  cwd=outside, env=env).stdout.split()
    assert all(Path(path).is_relative_to(target) for path in located), located
    job = run([sys.executable, "-m", "repro", "--cfg", "job", "experiment=demo"], cwd=outside, env=env).stdout
    assert "experiment: demo" in job and "encoder_layers:" in job
    finetune = run([sys.executable, "-m", "repro", "--cfg", "job", "experiment=base_10m"], cwd=outside, env=env)
    assert "experiment: base_10m" in finetune.stdout
    assert not any(outside.iterdir()), "printing the config must not create run directories"
