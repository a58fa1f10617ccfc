"""Fixtures shared by test modules that build several Trainers in one process."""

from __future__ import annotations

import pytest
from accelerate.state import AcceleratorState, GradientState


def reset_accelerate_state() -> None:
    """Forget Accelerate's process-wide singletons, so that the next Accelerator starts from scratch."""
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture
def fresh_accelerate():
    """A clean Accelerate state before and after the test; call the value to reset it between two Trainers."""
    reset_accelerate_state()
    yield reset_accelerate_state
    reset_accelerate_state()
