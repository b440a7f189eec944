"""Classifier-free guidance: how cond and uncond predictions combine, and on which steps uncond is run.

Two forms are in use, and a config must say which it means:
  standard (Wan):          uncond + g * (cond - uncond)
  dmd (Self-Forcing teacher): cond + g * (cond - uncond), i.e. standard with scale 1 + g.
For a MoE teacher the high-noise steps (the first `num_high_noise_steps` of the schedule) may use their
own scale and their own truncation window.
"""

from __future__ import annotations

from torch import Tensor

from utils.config import SamplingConfig
from utils.errors import UserError

GUIDANCE_FORMS = ("standard", "dmd")


def combine_cfg(cond: Tensor, uncond: Tensor, scale: float, form: str) -> Tensor:
    """The guided prediction from the conditional and unconditional ones."""
    if form == "standard":
        return uncond + scale * (cond - uncond)
    if form == "dmd":
        return cond + scale * (cond - uncond)
    raise UserError(f"sampling.guidance_form must be one of {', '.join(GUIDANCE_FORMS)}, got {form!r}")


def guidance_is_identity(scale: float, form: str) -> bool:
    """True when the guided prediction equals the conditional one, so uncond need not be computed."""
    if form not in GUIDANCE_FORMS:
        raise UserError(f"sampling.guidance_form must be one of {', '.join(GUIDANCE_FORMS)}, got {form!r}")
    return scale == (1.0 if form == "standard" else 0.0)


def check_guidance(sampling: SamplingConfig, *, is_moe: bool) -> None:
    """Reject settings that cannot mean anything for this teacher, before any model runs."""
    if sampling.guidance_form not in GUIDANCE_FORMS:
        raise UserError(f"sampling.guidance_form must be one of {', '.join(GUIDANCE_FORMS)}, got {sampling.guidance_form!r}")
    if not 0 <= sampling.cfg_truncation_steps <= sampling.num_steps:
        raise UserError(
            f"sampling.cfg_truncation_steps is {sampling.cfg_truncation_steps}: expected 0..{sampling.num_steps} (num_steps)"
        )
    if sampling.cfg_truncation_high_noise_steps < 0:
        raise UserError(
            f"sampling.cfg_truncation_high_noise_steps is {sampling.cfg_truncation_high_noise_steps}: expected 0 or more"
        )
    if not is_moe and sampling.guidance_scale_high_noise is not None:
        raise UserError("sampling.guidance_scale_high_noise is set but the teacher is not a MoE model (no boundary)")
    if not is_moe and sampling.cfg_truncation_high_noise_steps > 0:
        raise UserError("sampling.cfg_truncation_high_noise_steps is set but the teacher is not a MoE model (no boundary)")


def guidance_scale_at(step_index: int, sampling: SamplingConfig, *, num_high_noise_steps: int) -> float:
    """The CFG scale of one step: the high-noise expert's on the first num_high_noise_steps steps (if set)."""
    if step_index < num_high_noise_steps and sampling.guidance_scale_high_noise is not None:
        return sampling.guidance_scale_high_noise
    return sampling.guidance_scale


def uses_uncond(step_index: int, sampling: SamplingConfig, *, num_high_noise_steps: int) -> bool:
    """Whether step `step_index` runs the unconditional pass.

    It is skipped in the last cfg_truncation_steps steps of the schedule, in the last
    cfg_truncation_high_noise_steps of the high-noise phase (steps [0, num_high_noise_steps)), and on
    any step whose scale makes guidance a no-op. num_high_noise_steps is 0 for a single-expert teacher.
    """
    if step_index >= sampling.num_steps - sampling.cfg_truncation_steps:
        return False
    high_noise_cut = num_high_noise_steps - sampling.cfg_truncation_high_noise_steps
    if max(high_noise_cut, 0) <= step_index < num_high_noise_steps:
        return False
    scale = guidance_scale_at(step_index, sampling, num_high_noise_steps=num_high_noise_steps)
    return not guidance_is_identity(scale, sampling.guidance_form)
