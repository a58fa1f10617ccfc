"""Shared fixtures: fresh Accelerate singletons, the comparison CLI as a function, and the multimodal tests'
environment (data extras, one thread, a speech cache per module)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState


def reset_accelerate() -> None:
    """Accelerate keeps process-wide singletons: a test that builds a Trainer after another must reset them."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate():
    """A clean Accelerate state before and after the test; call the value to reset it between two Trainers."""
    reset_accelerate()
    yield reset_accelerate
    reset_accelerate()


@pytest.fixture(scope="module")
def mm_cache(tmp_path_factory) -> str:
    """The multimodal tests' speech cache, one per module; skips without the data extras (module-scoped
    fixtures built from it, such as loaded tasks, come first, so the skip must be here)."""
    for module in ("espeakng_loader", "mlxtend"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"needs the data extras ({module})")
    return str(tmp_path_factory.mktemp("speech"))


@pytest.fixture
def mm_env(mm_cache, fresh_accelerate):
    """Module-wide for the multimodal tests (``pytestmark = pytest.mark.usefixtures("mm_env")``): the extras
    check, fresh Accelerate state and one torch thread (tiny ops run far faster so on a busy CPU)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def keep_threads():
    """Restore torch's intra-op thread count after a test that runs a recipe's ``main`` (it sets --threads)."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def load_recipe(name: str):
    """recipes/<name>.py as a module (the recipes are scripts, not modules of the package)."""
    path = Path(__file__).parents[1] / "recipes" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"{name}_recipe", path)
    recipe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(recipe)
    return recipe


@pytest.fixture(scope="session")
def compare_cli():
    """``main(argv)`` of recipes/compare.py."""
    return load_recipe("compare").main
