"""Schedules and step objects: the official Wan schedule, Self-Forcing's warped student list, and
Euler / UniPC stepping against diffusers' schedulers (the independent implementation)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler
from torch import nn

from pipeline.flow_matching import few_step_timesteps, shift_sigmas
from pipeline.samplers import EulerSampler, UniPCSampler, make_sampler
from pipeline.schedule import teacher_sigmas
from utils.errors import UserError

NUM_TRAIN_TIMESTEPS = 1000


# ----------------------------------------------------------------------------------------- schedules
def official_wan_sigmas(num_steps: int, shift: float, num_train_timesteps: int) -> np.ndarray:
    """Wan's FlowUniPCMultistepScheduler(shift=1) + set_timesteps(num_steps, shift=shift), restated in numpy."""
    alphas = np.linspace(1, 1 / num_train_timesteps, num_train_timesteps)[::-1].copy()
    table = torch.from_numpy(1.0 - alphas).to(torch.float32)  # the constructor's training sigmas
    sigma_max, sigma_min = table[0].item(), table[-1].item()
    sigmas = np.linspace(sigma_max, sigma_min, num_steps + 1).copy()[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    return np.concatenate([sigmas, [0.0]]).astype(np.float32)


@pytest.mark.parametrize("num_steps,shift", [(50, 5.0), (40, 12.0), (48, 8.0), (4, 3.0)])
def test_teacher_sigmas_follow_the_official_definition(num_steps: int, shift: float) -> None:
    ours = teacher_sigmas(num_steps, shift, NUM_TRAIN_TIMESTEPS)
    assert ours.shape == (num_steps + 1,) and ours.dtype == torch.float64
    assert ours[-1].item() == 0.0
    np.testing.assert_allclose(ours.numpy(), official_wan_sigmas(num_steps, shift, NUM_TRAIN_TIMESTEPS), atol=1e-7)


def test_teacher_sigmas_pinned_values() -> None:
    # Wan2.1 defaults (50 steps, shift 5), computed once from the official definition.
    sigmas = teacher_sigmas(50, 5.0, NUM_TRAIN_TIMESTEPS)
    expected = {0: 0.99979984, 1: 0.99573237, 10: 0.95215404, 49: 0.09250686, 50: 0.0}
    for index, value in expected.items():
        assert sigmas[index].item() == pytest.approx(value, abs=1e-7)
    # The first sigma is shift(1 - 1/T), not 1: the model never sees a timestep of exactly 1000.
    assert UniPCSampler(sigmas).model_timesteps(NUM_TRAIN_TIMESTEPS)[:3].tolist() == [999.0, 995.0, 991.0]


def test_shift_sigmas_endpoints_and_monotonicity() -> None:
    base = torch.linspace(0, 1, 11, dtype=torch.float64)
    shifted = shift_sigmas(base, 5.0)
    assert shifted[0].item() == 0.0 and shifted[-1].item() == 1.0
    assert bool((shifted[1:-1] > base[1:-1]).all())  # shift > 1 moves every interior point towards noise
    assert shifted[5].item() == pytest.approx(5 * 0.5 / (1 + 4 * 0.5))
    assert torch.equal(shift_sigmas(base, 1.0), base)


def test_few_step_timesteps_warped_matches_published_values() -> None:
    warped = few_step_timesteps([1000, 750, 500, 250], True, 5.0, NUM_TRAIN_TIMESTEPS)
    assert warped.tolist() == pytest.approx([1000.0, 937.5, 833.3333, 625.0], abs=1e-3)


def test_few_step_timesteps_equals_upstream_table_lookup() -> None:
    # Upstream: a 1000-entry shifted table (sigma = 1 .. 1/T) plus a trailing 0, indexed at T - t.
    shift, steps = 8.0, [1000, 800, 600, 400, 200, 37, 0]
    table_sigmas = torch.linspace(1.0, 0.0, NUM_TRAIN_TIMESTEPS + 1)[:-1]
    table = torch.cat([shift * table_sigmas / (1 + (shift - 1) * table_sigmas) * NUM_TRAIN_TIMESTEPS, torch.zeros(1)])
    upstream = table[NUM_TRAIN_TIMESTEPS - torch.tensor(steps)]
    ours = few_step_timesteps(steps, True, shift, NUM_TRAIN_TIMESTEPS)
    torch.testing.assert_close(ours, upstream, atol=1e-3, rtol=0)


def test_few_step_timesteps_unwarped_and_errors() -> None:
    assert few_step_timesteps([1000, 750, 500, 250], False, 5.0, NUM_TRAIN_TIMESTEPS).tolist() == [1000, 750, 500, 250]
    with pytest.raises(UserError, match="denoising_step_list"):
        few_step_timesteps([1200, 500], True, 5.0, NUM_TRAIN_TIMESTEPS)
    with pytest.raises(UserError, match="empty"):
        few_step_timesteps([], True, 5.0, NUM_TRAIN_TIMESTEPS)


# ----------------------------------------------------------------------------------------- samplers
class TinyFlowModel(nn.Module):
    """A small nonlinear stand-in with predict_flow's signature; its output depends on x, t and context."""

    def __init__(self, channels: int, context_dim: int) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.mix = nn.Conv3d(channels, channels, 3, padding=1)
        self.time = nn.Linear(1, channels)
        self.text = nn.Linear(context_dim, channels)

    def predict_flow(self, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        spatial = torch.tanh(self.mix(x.transpose(1, 2))).transpose(1, 2)  # [B, F, C, H, W]
        time = self.time(timestep.to(x.dtype)[..., None] / 1000)[..., None, None]  # [B, F, C, 1, 1]
        text = self.text(context.mean(1))[:, None, :, None, None]
        return spatial + time * torch.sin(x) + text


def _run_ours(sampler, model, x, context):
    timesteps = sampler.model_timesteps(NUM_TRAIN_TIMESTEPS)
    states = []
    for index in range(sampler.num_steps):
        t = timesteps[index].expand(x.shape[0], x.shape[1])
        x = sampler.step(model.predict_flow(x, t, context), index, x)
        states.append(x)
    return states


def _run_diffusers(scheduler, model, x, context):
    states = []
    for t in scheduler.timesteps:
        v = model.predict_flow(x, t.to(torch.float32).expand(x.shape[0], x.shape[1]), context)
        x = scheduler.step(v, t, x, return_dict=False)[0]
        states.append(x)
    return states


def _inputs():
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 3, 4, 4, 4, generator=generator)
    context = torch.randn(2, 5, 8, generator=generator)
    return TinyFlowModel(channels=4, context_dim=8), x, context


@pytest.mark.parametrize("num_steps,shift", [(1, 5.0), (2, 5.0), (7, 5.0), (12, 8.0)])
def test_euler_matches_diffusers_step_for_step(num_steps: int, shift: float) -> None:
    model, x, context = _inputs()
    sigmas = teacher_sigmas(num_steps, shift, NUM_TRAIN_TIMESTEPS)
    reference = FlowMatchEulerDiscreteScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, shift=1.0)
    reference.set_timesteps(sigmas=sigmas[:-1].tolist())
    ours = EulerSampler(sigmas)
    torch.testing.assert_close(ours.model_timesteps(NUM_TRAIN_TIMESTEPS), reference.timesteps.float())
    with torch.no_grad():
        for step, (a, b) in enumerate(zip(_run_ours(ours, model, x, context), _run_diffusers(reference, model, x, context))):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"euler step {step}")


@pytest.mark.parametrize("num_steps,shift", [(1, 5.0), (2, 5.0), (3, 5.0), (8, 5.0), (20, 12.0)])
def test_unipc_matches_diffusers_step_for_step(num_steps: int, shift: float) -> None:
    model, x, context = _inputs()
    sigmas = teacher_sigmas(num_steps, shift, NUM_TRAIN_TIMESTEPS)
    reference = UniPCMultistepScheduler(
        num_train_timesteps=NUM_TRAIN_TIMESTEPS,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=1.0,  # the sigmas handed over are already shifted
        solver_order=2,
        solver_type="bh2",
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    reference.set_timesteps(sigmas=sigmas[:-1].numpy())
    torch.testing.assert_close(reference.sigmas.double(), sigmas, atol=1e-7, rtol=0)
    ours = UniPCSampler(sigmas)
    assert torch.equal(ours.model_timesteps(NUM_TRAIN_TIMESTEPS), reference.timesteps.float())
    with torch.no_grad():
        ours_states = _run_ours(ours, model, x, context)
        reference_states = _run_diffusers(reference, model, x, context)
    for step, (a, b) in enumerate(zip(ours_states, reference_states)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5, msg=f"unipc step {step}")
    # reset() makes the object reusable for a second video.
    ours.reset()
    with torch.no_grad():
        torch.testing.assert_close(_run_ours(ours, model, x, context)[-1], reference_states[-1], atol=1e-5, rtol=1e-5)


def _gaussian_flow(mean: float, std: float):
    """Exact flow of data x0 ~ N(mean, std^2): v(x, sigma) = E[noise - x0 | x_sigma]."""

    def flow(x: torch.Tensor, sigma: float) -> torch.Tensor:
        alpha = 1.0 - sigma
        variance = alpha**2 * std**2 + sigma**2
        centred = x - alpha * mean
        x0 = mean + alpha * std**2 / variance * centred
        noise = sigma / variance * centred
        return noise - x0

    return flow


def test_unipc_is_more_accurate_than_euler_on_an_exact_flow() -> None:
    # For Gaussian data the probability-flow ODE keeps the standard score z = (x - alpha*mean) / sqrt(var)
    # of every sample, so the exact endpoint of a start at sigmas[0] is mean + std * z.
    mean, std, num_steps = 0.7, 0.3, 50
    flow = _gaussian_flow(mean, std)
    sigmas = teacher_sigmas(num_steps, 3.0, NUM_TRAIN_TIMESTEPS)
    start_sigma = sigmas[0].item()
    start_var = (1 - start_sigma) ** 2 * std**2 + start_sigma**2
    noise = torch.randn(4096, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    target = mean + std * (noise - (1 - start_sigma) * mean) / math.sqrt(start_var)
    errors = {}
    for name in ("euler", "unipc"):
        sampler = make_sampler(name, sigmas)
        x = noise
        for index in range(num_steps):
            x = sampler.step(flow(x, sigmas[index].item()), index, x)
        errors[name] = (x - target).abs().max().item()
    # Measured: euler 0.091, unipc 0.0014; a first-order or broken multistep update would not get near.
    assert errors["unipc"] < errors["euler"] / 20, errors
    assert errors["unipc"] < 5e-3, errors


def test_unipc_lands_on_the_data_prediction_at_sigma_zero() -> None:
    # When every x0 prediction is the same constant, the final UniPC step returns it exactly.
    sigmas = teacher_sigmas(5, 5.0, NUM_TRAIN_TIMESTEPS)
    sampler = UniPCSampler(sigmas)
    clean = torch.full((3,), 0.25, dtype=torch.float64)
    x = torch.randn(3, dtype=torch.float64)
    for index in range(5):
        x = sampler.step((x - clean) / sigmas[index].item(), index, x)
    torch.testing.assert_close(x, clean, atol=1e-12, rtol=0)


def test_sampler_errors() -> None:
    with pytest.raises(UserError, match="sampling.sampler"):
        make_sampler("ddim", teacher_sigmas(4, 5.0, NUM_TRAIN_TIMESTEPS))
    with pytest.raises(UserError, match="decreasing"):
        make_sampler("euler", torch.tensor([0.5, 0.7, 0.0]))
    with pytest.raises(UserError, match="below 1"):
        UniPCSampler(torch.tensor([1.0, 0.5, 0.0]))
    with pytest.raises(UserError, match="num_steps"):
        teacher_sigmas(0, 5.0, NUM_TRAIN_TIMESTEPS)
    sampler = UniPCSampler(teacher_sigmas(4, 5.0, NUM_TRAIN_TIMESTEPS))
    with pytest.raises(RuntimeError, match="expected step 0"):
        sampler.step(torch.zeros(2), 1, torch.zeros(2))


def test_flow_matching_arithmetic_is_one_consistent_set():
    """x0 from the noised latent and its true flow is x0 again, at every timestep; draws stay in (0, T]."""
    from pipeline.flow_matching import add_noise, draw_shifted_timesteps, flow_target, predict_x0

    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 4, 5, 6, generator=g), torch.randn(2, 3, 4, 5, 6, generator=g)
    timestep = torch.tensor([[0.0, 500.0, 1000.0], [250.0, 937.5, 1.0]])
    x_t = add_noise(x0, noise, timestep, 1000)
    assert torch.allclose(x_t[0, 0], x0[0, 0]) and torch.allclose(x_t[0, 2], noise[0, 2])
    assert torch.allclose(predict_x0(x_t, flow_target(x0, noise), timestep, 1000), x0, atol=1e-5)
    drawn = draw_shifted_timesteps(4096, 5.0, 1000, generator=torch.Generator().manual_seed(1))
    assert drawn.dtype == torch.float32 and float(drawn.min()) > 0 and float(drawn.max()) <= 1000
    assert float(drawn.median()) > 800  # shift 5 puts most draws at high noise (median sigma 5/6)
