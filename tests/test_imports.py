"""Each package imports on its own, in any order, and exports what its __all__ promises; the Trainer holds no
MoE code (it reaches MoE models only through the extension seam)."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGES = ["moekit.core", "moekit.moe", "moekit.multimodal", "moekit.experiment"]


SUBMODULES = [
    "moekit.core.layers",
    "moekit.experiment.matching",
    "moekit.core.train",
    "moekit.experiment.lm",
    "moekit.moe.extension",
]
SUBMODULES += [
    "moekit.experiment.matching",
    "moekit.core.train_config",
    "moekit.core.meter",
    "moekit.core.objective",
    "moekit.core.extension",
]
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("first", PACKAGES + SUBMODULES)
def test_fresh_import_order(first):
    code = f"import {first}\n" + "".join(f"import {p}\n" for p in PACKAGES)
    code += "".join(
        f"m = __import__('{p}', fromlist=['*'])\n[getattr(m, n) for n in getattr(m, '__all__', [])]\n" for p in PACKAGES
    )
    # The GPL speech engine must never be loaded by importing the library.
    code += "import sys\nassert not any('espeak' in k for k in sys.modules), 'espeak loaded'\n"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("name", ["train.py", "train_config.py"])
def test_trainer_has_no_moe_code(name):
    """No import of moekit.moe, and no MoE vocabulary outside docstrings/comments naming the extension."""
    code = re.sub(r'""".*?"""', "", (ROOT / "core" / name).read_text(), flags=re.S)  # docstrings may point at it
    code_lines = [line.split("#")[0] for line in code.splitlines()]
    assert not [line for line in code_lines if re.search(r"moekit\.moe|\bmoe\b|MoE|expert|router", line)], name
