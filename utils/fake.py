"""Running the real training step on fake tensors (scripts/estimate_memory.py: FakeTensorMode, no memory, no data).

The few places that turn a tensor into a Python value (drawn exit steps and ODE points, checks of given
timesteps) read real tensors inside `real_values()`; outside a fake mode it changes nothing.
"""
from __future__ import annotations

from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import unset_fake_temporarily


def fake_mode_active() -> bool:
    """Whether tensors made now are fake (inside the estimator's FakeTensorMode)."""
    return detect_fake_mode() is not None


def real_values():
    """A context in which tensors are real again (a no-op when no fake mode is active)."""
    return unset_fake_temporarily()
