"""`pip install .` (non-editable) must give a working `moekit` namespace and nothing else.

The venv also holds an editable install whose import finder is registered by a .pth file, so the
installed copy is imported with ``python -S`` (no site processing, hence no .pth files) and an
explicit PYTHONPATH of the install target plus the venv's site-packages (for torch, yaml, ...).
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# Build from a clean copy: an in-tree build leaves build/ and *.egg-info behind, and a stale build/lib
# could smuggle deleted files into the wheel.
IGNORE = shutil.ignore_patterns(
    ".venv", ".git", "build", "dist", "*.egg-info", "__pycache__", "runs", "out", ".*_cache"
)
PIP_ENV = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}

pytestmark = pytest.mark.slow


def _pip(*args: str) -> None:
    cmd = [sys.executable, "-m", "pip", *args, "--no-deps", "--no-index", "-q"]
    proc = subprocess.run(cmd, env=PIP_ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout}\n{proc.stderr}"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src"
    shutil.copytree(ROOT, src, ignore=IGNORE)
    _pip("wheel", str(src), "--no-build-isolation", "-w", str(tmp / "wheels"))
    (whl,) = (tmp / "wheels").glob("moekit-*.whl")
    return whl


def test_wheel_contains_only_the_moekit_namespace(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    required_files = ("moekit/core/config.py", "moekit/moe/config.py", "moekit/multimodal/__init__.py")
    for required in (*required_files, "moekit/experiment/plan.py"):
        assert required in names
    top_level = {n.split("/")[0] for n in names}
    assert not top_level & {"core", "moe", "multimodal", "experiment", "tests", "recipes"}
    (dist_info,) = top_level - {"moekit"}  # the only other entry is the metadata folder
    assert dist_info.startswith("moekit-") and dist_info.endswith(".dist-info")


def test_installed_wheel_imports_from_target(wheel, tmp_path):
    target = tmp_path / "target"
    _pip("install", "--target", str(target), str(wheel))
    code = (
        "import json, sys, moekit.core.config as c, moekit.moe.config as m\n"
        "c.ModelConfig()\n"
        "finders = [type(f).__name__ for f in sys.meta_path]\n"
        "print(json.dumps({'core': c.__file__, 'moe': m.__file__, 'finders': finders}))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON")}
    env["PYTHONPATH"] = os.pathsep.join([str(target), sysconfig.get_paths()["purelib"]])
    cwd = tmp_path / "elsewhere"
    cwd.mkdir()
    proc = subprocess.run(
        [sys.executable, "-S", "-c", code], cwd=cwd, env=env, capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not any("editable" in f.lower() for f in result["finders"])
    for key in ("core", "moe"):
        assert Path(result[key]).resolve().is_relative_to(target.resolve()), result
