"""scripts/build-kenlm.sh (run by `make setup`): the compiler's output goes to a log, not the terminal.

The build tools are stand-ins on PATH (a `cmake` that prints pages of warnings, a `pip` that hands
over a tiny sdist): what is tested is what the script shows and keeps, not KenLM itself.
"""

from __future__ import annotations

import os
import subprocess
import tarfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
WARNING_LINES = 400

FAKE_PIP = """#!/usr/bin/env bash
# `pip download ... -d DIR`: leave the kenlm sdist in DIR
while [ $# -gt 0 ]; do [ "$1" = -d ] && dest=$2; shift; done
cp "$FAKE_SDIST" "$dest/"
"""

FAKE_CMAKE = f"""#!/usr/bin/env bash
if [ "$1" = --build ]; then
  for i in $(seq {WARNING_LINES}); do echo "lm/trie.hh:$i: warning: comparison of integer expressions" >&2; done
  if [ -n "$FAKE_CMAKE_FAIL" ]; then echo "lm/model.cc:12: error: boost/thread.hpp: No such file" >&2; exit 2; fi
  mkdir -p "$2/bin" && printf '#!/bin/sh\\n' | tee "$2/bin/lmplz" > "$2/bin/build_binary"
else
  echo "-- The CXX compiler identification is GNU"
fi
"""


def fake_environment(tmp_path: Path) -> tuple[Path, dict[str, str]]:
    venv, tools = tmp_path / "venv", tmp_path / "tools"
    (venv / "bin").mkdir(parents=True)
    tools.mkdir()
    for path, text in ((venv / "bin" / "pip", FAKE_PIP), (tools / "cmake", FAKE_CMAKE)):
        path.write_text(text)
        path.chmod(0o755)
    source = tmp_path / "kenlm-0.3.0"
    source.mkdir()
    (source / "CMakeLists.txt").write_text("project(kenlm)\n")
    sdist = tmp_path / "kenlm-0.3.0.tar.gz"
    with tarfile.open(sdist, "w:gz") as archive:
        archive.add(source, arcname="kenlm-0.3.0")
    env = dict(os.environ, VENV=str(venv), FAKE_SDIST=str(sdist), PATH=f"{tools}{os.pathsep}{os.environ['PATH']}")
    return venv, env


def build(env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "scripts" / "build-kenlm.sh")], env=env, capture_output=True,
                          text=True, timeout=60)


def test_kenlm_build_prints_one_line_and_keeps_the_compiler_output_in_a_log(tmp_path: Path) -> None:
    venv, env = fake_environment(tmp_path)
    done = build(env)
    assert done.returncode == 0, done.stderr
    log = venv / "kenlm-build.log"
    assert done.stderr == ""
    assert done.stdout.splitlines() == [
        f"setup: building KenLM lmplz/build_binary from the kenlm 0.3.0 sdist (~40 s; compiler output in {log})"
    ]
    assert log.read_text().count("warning: comparison") == WARNING_LINES
    assert os.access(venv / "bin" / "lmplz", os.X_OK) and os.access(venv / "bin" / "build_binary", os.X_OK)

    (venv / "bin" / "lmplz").unlink()
    (venv / "bin" / "build_binary").unlink()
    failed = build(dict(env, FAKE_CMAKE_FAIL="1"))
    assert failed.returncode == 1
    report = failed.stderr.splitlines()
    assert report[0] == (f"setup: building KenLM failed while compiling (exit 2); the full output is in {log}, "
                         "it ends with:")
    assert report[-1] == "  | lm/model.cc:12: error: boost/thread.hpp: No such file"
    assert len(report) <= 16  # the error and its context, not the pages of warnings before it
    assert not (venv / "bin" / "lmplz").exists()
