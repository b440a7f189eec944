"""Teacher sampling: CFG forms and truncation, honest nfe, kept trajectory points, TI2V first-frame
conditioning and the MoE high-noise phase, with stand-in denoisers that record what they are called with."""

from __future__ import annotations

import pytest
import torch

from pipeline.guidance import combine_cfg, guidance_scale_at, uses_uncond
from pipeline.samplers import EulerSampler, UniPCSampler
from pipeline.schedule import teacher_sigmas
from pipeline.teacher_sampling import count_high_noise_steps, sample_teacher
from tests.dit_helpers import tiny_model
from utils.config import SamplingConfig
from utils.errors import UserError

NUM_TRAIN_TIMESTEPS = 1000
SHAPE = (2, 3, 4, 4, 4)  # B, F, C, H, W


class ContextEcho:
    """v = mean of the context everywhere: cond (ones) gives 1, uncond (zeros) gives 0.

    Records (timestep [B, F], context value) for every call.
    """

    def __init__(self) -> None:
        self.calls: list[tuple[torch.Tensor, float]] = []

    def predict_flow(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        assert timestep.shape == x.shape[:2]
        self.calls.append((timestep.clone(), context.mean().item()))
        return torch.full_like(x, context.mean().item())

    def calls_per_step(self) -> list[list[float]]:
        """Context values of the calls, grouped by consecutive equal timesteps (one group per step)."""
        groups: list[list[float]] = []
        previous = None
        for timestep, value in self.calls:
            if previous is None or not torch.equal(timestep, previous):
                groups.append([])
            groups[-1].append(value)
            previous = timestep
        return groups


class TinyFlow:
    """A nonlinear denoiser in x and t with a context term, for trajectory checks."""

    def __init__(self) -> None:
        self.weight = torch.randn(SHAPE[2], SHAPE[2], generator=torch.Generator().manual_seed(3)) / 2

    def predict_flow(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        mixed = torch.einsum("dc,bfchw->bfdhw", self.weight, torch.tanh(x))
        return mixed * (timestep[..., None, None, None] / 1000) + context.mean(dim=(1, 2))[:, None, None, None, None]


def _contexts() -> tuple[torch.Tensor, torch.Tensor]:
    # Different lengths on purpose: cond and uncond run as separate calls.
    return torch.ones(SHAPE[0], 3, 8), torch.zeros(SHAPE[0], 2, 8)


def _noise() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


def _euler_end(noise: torch.Tensor, sigmas: torch.Tensor, velocities: list[float]) -> torch.Tensor:
    """Euler with a spatially constant velocity per step."""
    x = noise.clone()
    for index, v in enumerate(velocities):
        x = x + (sigmas[index + 1] - sigmas[index]).item() * v
    return x


# ----------------------------------------------------------------------------------------- guidance
def test_combine_cfg_forms() -> None:
    cond, uncond = torch.tensor([2.0]), torch.tensor([0.5])
    assert combine_cfg(cond, uncond, 3.0, "standard").item() == pytest.approx(0.5 + 3.0 * 1.5)
    assert combine_cfg(cond, uncond, 3.0, "dmd").item() == pytest.approx(2.0 + 3.0 * 1.5)
    # dmd with g equals standard with 1 + g.
    torch.testing.assert_close(combine_cfg(cond, uncond, 3.0, "dmd"), combine_cfg(cond, uncond, 4.0, "standard"))
    with pytest.raises(UserError, match="guidance_form"):
        combine_cfg(cond, uncond, 3.0, "cfg++")


def test_uses_uncond_truncation_windows() -> None:
    sampling = SamplingConfig(num_steps=10, guidance_scale=3.0, guidance_scale_high_noise=4.0)
    sampling.cfg_truncation_steps = 2
    sampling.cfg_truncation_high_noise_steps = 3
    used = [uses_uncond(i, sampling, num_high_noise_steps=6) for i in range(10)]
    # high-noise phase is steps 0..5: its last 3 skip uncond; the schedule's last 2 skip it.
    assert used == [True, True, True, False, False, False, True, True, False, False]
    assert [guidance_scale_at(i, sampling, num_high_noise_steps=6) for i in (0, 5, 6, 9)] == [4.0, 4.0, 3.0, 3.0]
    # A scale that makes guidance the identity needs no unconditional pass.
    assert not uses_uncond(0, SamplingConfig(guidance_scale=1.0, guidance_form="standard"), num_high_noise_steps=0)
    assert not uses_uncond(0, SamplingConfig(guidance_scale=0.0, guidance_form="dmd"), num_high_noise_steps=0)
    assert uses_uncond(0, SamplingConfig(guidance_scale=1.0, guidance_form="dmd"), num_high_noise_steps=0)


# ----------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("form,expected_v", [("standard", 3.0), ("dmd", 4.0)])
def test_cfg_form_reaches_the_sample(form: str, expected_v: float) -> None:
    sampling = SamplingConfig(sampler="euler", num_steps=5, shift=5.0, guidance_scale=3.0, guidance_form=form)
    noise = _noise()
    result = sample_teacher(ContextEcho(), noise, *_contexts(), sampling, num_train_timesteps=NUM_TRAIN_TIMESTEPS)
    sigmas = teacher_sigmas(5, 5.0, NUM_TRAIN_TIMESTEPS)
    torch.testing.assert_close(result.latent, _euler_end(noise, sigmas, [expected_v] * 5))
    assert result.nfe == 10 and result.trajectory is None


@pytest.mark.parametrize("sampler", ["euler", "unipc"])
def test_truncation_reduces_nfe_by_the_skipped_passes(sampler: str) -> None:
    cond, uncond = _contexts()
    full = SamplingConfig(sampler=sampler, num_steps=8, guidance_scale=5.0)
    echo = ContextEcho()
    assert sample_teacher(echo, _noise(), cond, uncond, full, num_train_timesteps=NUM_TRAIN_TIMESTEPS).nfe == 16
    assert len(echo.calls) == 16

    truncated = SamplingConfig(sampler=sampler, num_steps=8, guidance_scale=5.0, cfg_truncation_steps=3)
    echo = ContextEcho()
    result = sample_teacher(echo, _noise(), cond, uncond, truncated, num_train_timesteps=NUM_TRAIN_TIMESTEPS)
    assert result.nfe == 13 == len(echo.calls)
    assert echo.calls_per_step() == [[1.0, 0.0]] * 5 + [[1.0]] * 3  # cond first; uncond gone in the last 3

    no_guidance = SamplingConfig(sampler=sampler, num_steps=8, guidance_scale=1.0)
    assert sample_teacher(ContextEcho(), _noise(), cond, uncond, no_guidance, num_train_timesteps=NUM_TRAIN_TIMESTEPS).nfe == 8


def test_trajectory_points_are_the_latents_before_each_step() -> None:
    sampling = SamplingConfig(sampler="euler", num_steps=6, shift=5.0, guidance_scale=4.0)
    noise, (cond, uncond) = _noise(), _contexts()
    model = TinyFlow()
    result = sample_teacher(
        model, noise, cond, uncond, sampling, num_train_timesteps=NUM_TRAIN_TIMESTEPS, keep_indices=[0, 2, 4, -1]
    )
    assert result.trajectory is not None and result.trajectory.shape == (SHAPE[0], 4, *SHAPE[1:])
    # Replay by hand with the sampler: point i is x before step i, -1 is the output.
    sigmas = teacher_sigmas(6, 5.0, NUM_TRAIN_TIMESTEPS)
    sampler = EulerSampler(sigmas)
    timesteps = sampler.model_timesteps(NUM_TRAIN_TIMESTEPS)
    x, states = noise, [noise]
    for index in range(6):
        t = timesteps[index].expand(SHAPE[0], SHAPE[1])
        v = combine_cfg(model.predict_flow(x, t, cond), model.predict_flow(x, t, uncond), 4.0, "standard")
        x = sampler.step(v, index, x)
        states.append(x)
    for point, index in enumerate([0, 2, 4, 6]):
        torch.testing.assert_close(result.trajectory[:, point], states[index])
    assert torch.equal(result.trajectory[:, 0], noise)
    assert torch.equal(result.trajectory[:, -1], result.latent)
    expected_timesteps = torch.tensor([sigmas[0] * 1000, sigmas[2] * 1000, sigmas[4] * 1000, 0.0], dtype=torch.float32)
    torch.testing.assert_close(result.trajectory_timesteps, expected_timesteps)


def test_ti2v_keeps_the_first_frame_and_feeds_it_timestep_zero() -> None:
    sampling = SamplingConfig(sampler="unipc", num_steps=4, shift=5.0, guidance_scale=5.0)
    noise, (cond, uncond) = _noise(), _contexts()
    first_frame = torch.randn(SHAPE[0], 1, *SHAPE[2:], generator=torch.Generator().manual_seed(7))
    echo = ContextEcho()
    result = sample_teacher(
        echo,
        noise,
        cond,
        uncond,
        sampling,
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        first_frame=first_frame,
        keep_indices=[0, 1, 2, 3, -1],
    )
    for point in range(5):
        assert torch.equal(result.trajectory[:, point, :1], first_frame)
    assert torch.equal(result.latent[:, :1], first_frame)
    assert torch.equal(result.trajectory[:, 0, 1:], noise[:, 1:])
    assert not torch.equal(result.latent[:, 1:], noise[:, 1:])
    step_timesteps = UniPCSampler(teacher_sigmas(4, 5.0, NUM_TRAIN_TIMESTEPS)).model_timesteps(NUM_TRAIN_TIMESTEPS)
    for call, (timestep, _) in enumerate(echo.calls):
        assert torch.all(timestep[:, 0] == 0)
        assert torch.all(timestep[:, 1:] == step_timesteps[call // 2])


def test_ti2v_with_a_tiny_wan_model() -> None:
    model = tiny_model(preset="tiny-ti2v")
    arch = model.config
    generator = torch.Generator().manual_seed(0)
    noise = torch.randn(1, 2, arch["in_dim"], 4, 4, generator=generator)
    first_frame = torch.randn(1, 1, arch["in_dim"], 4, 4, generator=generator)
    cond = torch.randn(1, 5, arch["text_dim"], generator=generator)
    uncond = torch.randn(1, 3, arch["text_dim"], generator=generator)
    sampling = SamplingConfig(sampler="unipc", num_steps=3, shift=5.0, guidance_scale=5.0)
    result = sample_teacher(
        model,
        noise,
        cond,
        uncond,
        sampling,
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        first_frame=first_frame,
        keep_indices=[0, -1],
    )
    assert result.latent.shape == noise.shape and torch.isfinite(result.latent).all()
    assert torch.equal(result.latent[:, :1], first_frame) and torch.equal(result.trajectory[:, 0, :1], first_frame)
    assert result.nfe == 6


def test_moe_phase_uses_the_high_noise_scale_and_truncation() -> None:
    # Wan2.2-A14B: 40 UniPC steps, shift 12, boundary 0.875 -> 26 high-noise steps.
    unipc_timesteps = UniPCSampler(teacher_sigmas(40, 12.0, NUM_TRAIN_TIMESTEPS)).model_timesteps(NUM_TRAIN_TIMESTEPS)
    assert count_high_noise_steps(unipc_timesteps, 0.875, NUM_TRAIN_TIMESTEPS) == 26

    sampling = SamplingConfig(
        sampler="euler",
        num_steps=40,
        shift=12.0,
        guidance_scale=3.0,
        guidance_scale_high_noise=4.0,
        cfg_truncation_steps=2,
        cfg_truncation_high_noise_steps=3,
    )
    noise, (cond, uncond) = _noise(), _contexts()
    echo = ContextEcho()
    result = sample_teacher(echo, noise, cond, uncond, sampling, num_train_timesteps=NUM_TRAIN_TIMESTEPS, boundary=0.875)

    step_times = [timestep[0, 0].item() for timestep, value in echo.calls if value == 1.0]
    high = sum(t >= 875.0 for t in step_times)
    assert high == 26 and all(t >= 875 for t in step_times[:high])
    per_step = echo.calls_per_step()
    expected_calls = [[1.0, 0.0]] * 23 + [[1.0]] * 3 + [[1.0, 0.0]] * 12 + [[1.0]] * 2
    assert per_step == expected_calls
    assert result.nfe == 80 - 3 - 2
    # Guided v is 4 (high-noise scale) or 3, and 1 (cond only) where uncond was skipped.
    velocities = [(4.0 if i < 26 else 3.0) if len(calls) == 2 else 1.0 for i, calls in enumerate(per_step)]
    torch.testing.assert_close(result.latent, _euler_end(noise, teacher_sigmas(40, 12.0, NUM_TRAIN_TIMESTEPS), velocities))


def test_bad_inputs_stop_before_any_model_call() -> None:
    noise, (cond, uncond) = _noise(), _contexts()
    echo = ContextEcho()
    cases = [
        (dict(sampling=SamplingConfig(num_steps=4), keep_indices=[0, 5]), "keep index 5"),
        (dict(sampling=SamplingConfig(num_steps=4, guidance_scale_high_noise=4.0)), "guidance_scale_high_noise"),
        (dict(sampling=SamplingConfig(num_steps=4, cfg_truncation_steps=5)), "cfg_truncation_steps"),
        (dict(sampling=SamplingConfig(num_steps=4, guidance_form="plain")), "guidance_form"),
        (dict(sampling=SamplingConfig(num_steps=4, sampler="heun")), "sampling.sampler"),
        (dict(sampling=SamplingConfig(num_steps=4), first_frame=torch.zeros(2, 2, 4, 4, 4)), "first_frame"),
        (dict(sampling=SamplingConfig(num_steps=4), boundary=1.5), "boundary"),
    ]
    for kwargs, fragment in cases:
        with pytest.raises(UserError, match=fragment):
            sample_teacher(echo, noise, cond, uncond, num_train_timesteps=NUM_TRAIN_TIMESTEPS, **kwargs)
    with pytest.raises(UserError, match="uncond"):
        sample_teacher(echo, noise, cond, uncond[:1], SamplingConfig(num_steps=4), num_train_timesteps=NUM_TRAIN_TIMESTEPS)
    assert echo.calls == []
