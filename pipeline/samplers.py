"""Step objects that move a flow-matching latent along a sigma schedule, one model evaluation per step.

A sampler is built from sigmas [num_steps + 1] (decreasing, last 0). `step(v, i, x)` takes the
model's flow prediction v = noise - x0 at x (which sits at sigmas[i]) and returns the latent at
sigmas[i + 1]. `timesteps` are what the model is fed at each step. Coefficients are computed in
float64 from the schedule; tensor arithmetic stays in x's dtype.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
from torch import Tensor

from utils.errors import UserError

SAMPLER_NAMES = ("unipc", "euler")


class Sampler(Protocol):
    sigmas: Tensor
    num_steps: int

    def model_timesteps(self, num_train_timesteps: int) -> Tensor: ...

    def step(self, v: Tensor, step_index: int, x: Tensor) -> Tensor: ...

    def reset(self) -> None: ...


def _check_sigmas(sigmas: Tensor, sampler: str) -> Tensor:
    sigmas = sigmas.detach().to(device="cpu", dtype=torch.float64)
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise UserError(f"{sampler} sampler needs sigmas of shape [num_steps + 1] with num_steps >= 1, got {tuple(sigmas.shape)}")
    if not bool((sigmas[1:] < sigmas[:-1]).all()) or sigmas[-1].item() != 0.0 or sigmas[0].item() > 1.0:
        raise UserError(f"{sampler} sampler needs sigmas decreasing from at most 1 to exactly 0, got {sigmas.tolist()}")
    return sigmas


class EulerSampler:
    """First-order flow ODE step: x_next = x + (sigma_next - sigma) * v.

    Model timesteps stay fractional (num_train_timesteps * sigma), as in diffusers'
    FlowMatchEulerDiscreteScheduler and the upstream Self-Forcing ODE-pair generation.
    """

    def __init__(self, sigmas: Tensor) -> None:
        self.sigmas = _check_sigmas(sigmas, "euler")
        self.num_steps = self.sigmas.numel() - 1

    def model_timesteps(self, num_train_timesteps: int) -> Tensor:
        return (self.sigmas[:-1] * num_train_timesteps).to(torch.float32)

    def step(self, v: Tensor, step_index: int, x: Tensor) -> Tensor:
        delta = self.sigmas[step_index + 1].item() - self.sigmas[step_index].item()
        return x + delta * v.to(x.dtype)

    def reset(self) -> None:
        """Euler keeps no state between steps."""


def _half_log_snr(sigma: float) -> float:
    """lambda = log(alpha / sigma) with alpha = 1 - sigma (flow matching); +inf at sigma 0."""
    return math.inf if sigma == 0.0 else math.log(1.0 - sigma) - math.log(sigma)


class UniPCSampler:
    """UniPC multistep (Zhao et al. 2023) on data predictions: order 2, B(h) = e^h - 1 ("bh2").

    The behaviour of Wan's official FlowUniPCMultistepScheduler and diffusers' UniPCMultistepScheduler
    with flow sigmas: each step first corrects the incoming sample with the new model output (UniC),
    then predicts the next sample (UniP). The first step is first order (no history yet) and so is
    the last (lower_order_final), which lands exactly on the predicted clean latent at sigma 0.
    Model timesteps are truncated to integers, as both reference implementations do.
    """

    solver_order = 2

    def __init__(self, sigmas: Tensor) -> None:
        self.sigmas = _check_sigmas(sigmas, "unipc")
        if self.sigmas[0].item() >= 1.0:
            # alpha = 1 - sigma is 0 there, and the log-SNR step size is undefined.
            raise UserError(f"unipc sampler needs the first sigma below 1, got {self.sigmas[0].item()}")
        self.num_steps = self.sigmas.numel() - 1
        self._lambdas = [_half_log_snr(s) for s in self.sigmas.tolist()]
        self.reset()

    def model_timesteps(self, num_train_timesteps: int) -> Tensor:
        return torch.floor(self.sigmas[:-1] * num_train_timesteps).to(torch.float32)

    def reset(self) -> None:
        self._x0_history: list[Tensor] = []  # data predictions, oldest first, at most solver_order
        self._last_sample: Tensor | None = None  # the sample the previous predictor started from
        self._last_order = 0
        self._next_index = 0

    def step(self, v: Tensor, step_index: int, x: Tensor) -> Tensor:
        if step_index != self._next_index:
            raise RuntimeError(f"UniPCSampler expected step {self._next_index}, got {step_index}; call reset() to restart")
        sigma = self.sigmas[step_index].item()
        x0 = x - sigma * v.to(x.dtype)

        # 1. UniC: the model output at x refines x itself (the result of the previous predictor).
        if self._last_sample is not None:
            x = self._correct(x0, step_index)

        # 2. Push the new data prediction into the history.
        self._x0_history = (self._x0_history + [x0])[-self.solver_order :]

        # 3. UniP: warm up from first order, and fall back to first order on the final step.
        order = min(self.solver_order, self.num_steps - step_index, len(self._x0_history))
        self._last_sample = x
        self._last_order = order
        self._next_index = step_index + 1
        return self._predict(x, step_index, order)

    def _step_terms(self, source: int, target: int) -> tuple[float, float, float, float]:
        """(sigma ratio, alpha_target, h, e^{-h} - 1) for one step from sigmas[source] to sigmas[target]."""
        sigma_s, sigma_t = self.sigmas[source].item(), self.sigmas[target].item()
        h = self._lambdas[target] - self._lambdas[source]
        return sigma_t / sigma_s, 1.0 - sigma_t, h, math.expm1(-h)

    def _predict(self, x: Tensor, step_index: int, order: int) -> Tensor:
        ratio, alpha_t, h, phi = self._step_terms(step_index, step_index + 1)
        x0 = self._x0_history[-1]
        if math.isinf(h):
            # Landing on sigma 0: ratio is 0 and e^{-h} - 1 = -1, so the first-order step is x0 itself.
            return x0.clone()
        x_next = ratio * x - alpha_t * phi * x0
        if order == 2:
            # Second order uses the slope to the previous data prediction; UniP-2 fixes its weight at 1/2.
            rk = (self._lambdas[step_index - 1] - self._lambdas[step_index]) / h
            slope = (self._x0_history[-2] - x0) / rk
            x_next = x_next - alpha_t * phi * 0.5 * slope
        return x_next

    def _correct(self, x0_new: Tensor, step_index: int) -> Tensor:
        """UniC of order self._last_order for the step sigmas[step_index - 1] -> sigmas[step_index]."""
        order = self._last_order
        ratio, alpha_t, h, phi = self._step_terms(step_index - 1, step_index)
        x0_prev = self._x0_history[-1]
        if order == 1:
            weights = [0.5]
            slopes: list[Tensor] = []
        else:
            rk = (self._lambdas[step_index - 2] - self._lambdas[step_index - 1]) / h
            weights = _corrector_weights_order2(rk, h, phi)
            slopes = [(self._x0_history[-2] - x0_prev) / rk]
        correction = weights[-1] * (x0_new - x0_prev)
        for weight, slope in zip(weights[:-1], slopes):
            correction = correction + weight * slope
        assert self._last_sample is not None
        return ratio * self._last_sample - alpha_t * phi * x0_prev - alpha_t * phi * correction


def _corrector_weights_order2(rk: float, h: float, phi: float) -> list[float]:
    """Weights of UniC-2 (bh2, data prediction), from the 2x2 system [[1, 1], [rk, 1]] rho = b.

    With hh = -h and B = e^{hh} - 1 (= phi): b_1 = (phi/hh - 1) / B and b_2 = 2 * ((phi/hh - 1)/hh - 1/2) / B.
    """
    hh = -h
    g1 = phi / hh - 1.0
    g2 = g1 / hh - 0.5
    b1, b2 = g1 / phi, 2.0 * g2 / phi
    # [[1, 1], [rk, 1]] @ [rho_0, rho_1] = [b1, b2]
    rho_0 = (b1 - b2) / (1.0 - rk)
    rho_1 = b1 - rho_0
    return [rho_0, rho_1]


def make_sampler(name: str, sigmas: Tensor) -> EulerSampler | UniPCSampler:
    if name == "unipc":
        return UniPCSampler(sigmas)
    if name == "euler":
        return EulerSampler(sigmas)
    raise UserError(f"sampling.sampler must be one of {', '.join(SAMPLER_NAMES)}, got {name!r}")
