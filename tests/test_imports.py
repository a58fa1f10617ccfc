"""Each package imports on its own, in any order, and exports what its __all__ promises."""

import subprocess
import sys

import pytest

PACKAGES = ["moekit.core", "moekit.moe", "moekit.multimodal", "moekit.experiment"]


SUBMODULES = ["moekit.core.layers", "moekit.experiment.matching", "moekit.core.train", "moekit.core.lm"]
SUBMODULES += ["moekit.core.train_config", "moekit.core.meter"]


@pytest.mark.parametrize("first", PACKAGES + SUBMODULES)
def test_fresh_import_order(first):
    code = f"import {first}\n" + "".join(f"import {p}\n" for p in PACKAGES)
    code += "".join(f"m = __import__('{p}', fromlist=['*'])\n[getattr(m, n) for n in m.__all__]\n" for p in PACKAGES)
    # The GPL speech engine must never be loaded by importing the library.
    code += "import sys\nassert not any('espeak' in k for k in sys.modules), 'espeak loaded'\n"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_lazy_exports_are_functions():
    from moekit.experiment import dense_twin
    from moekit.moe import upcycle

    assert callable(upcycle) and callable(dense_twin)
