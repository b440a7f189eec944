"""Objectives: DMD and SiD formulas against direct float64 computations, score timesteps inside the clamp,
ODE regression on a stand-in that knows the answer, and the hooks end to end on tiny models."""
from __future__ import annotations

import pytest
import torch

from model import Batch, Models, build_objective
from model.dmd import DMD, dmd_gradient, dmd_loss
from model.ode import OdeRegression
from model.score import ScoreTimesteps
from model.sid import SiD, sid_loss
from pipeline.components import build_dit
from utils.config import load_config
from utils.errors import UserError
from utils.geometry import resolve_recipe

RECIPE = "configs/tiny/self_forcing_dmd.yaml"


def recipe(*overrides: str, path: str = RECIPE):
    config = load_config(path, list(overrides))
    return config, resolve_recipe(config)


def stand_in_scores(seed=0, shape=(2, 6, 16, 4, 6)):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(shape, generator=g, dtype=torch.float64) for _ in range(3))


# --------------------------------------------------------------------------------------------- formulas
def test_dmd_gradient_and_loss_match_a_direct_float64_computation():
    x, real, fake = stand_in_scores()
    x32 = x.float().requires_grad_()
    grad = dmd_gradient(x32, real.float(), fake.float())
    expected = torch.stack([(fake[b] - real[b]) / (x[b] - real[b]).abs().mean() for b in range(2)])
    assert grad.dtype == torch.float64 and torch.allclose(grad, expected, atol=1e-6)
    loss, _ = dmd_loss(x32, real.float(), fake.float())
    assert loss.dtype == torch.float64
    assert torch.allclose(loss, 0.5 * expected.square().mean(), atol=1e-8)
    loss.backward()  # d/dx 0.5 * mean((x - target)^2) = grad / numel
    assert torch.allclose(x32.grad.double(), expected / x.numel(), atol=1e-9)


def test_dmd_with_equal_real_and_fake_scores_gives_zero_gradient():
    x, real, _ = stand_in_scores(1)
    x32 = x.float().requires_grad_()
    loss, grad = dmd_loss(x32, real.float(), real.float())
    loss.backward()
    assert float(grad.abs().max()) == 0.0 and float(x32.grad.abs().max()) == 0.0 and float(loss.detach()) == 0.0


def test_zero_normaliser_is_zero_gradient_but_non_finite_scores_reach_the_guard():
    from model.sid import sid_loss

    x, real, fake = stand_in_scores(2)
    grad = dmd_gradient(real.clone(), real, fake)  # x == real: normaliser 0, the sample contributes nothing
    assert torch.isfinite(grad).all() and float(grad.abs().max()) == 0.0
    assert float(sid_loss(real.clone(), real, fake, 1.0)) == 0.0
    # a NaN setting or NaN weights give NaN scores: the loss must say so (the trainer's non-finite guard fires)
    broken = real.clone()
    broken[0, 0, 0, 0, 0] = float("nan")
    assert not torch.isfinite(dmd_loss(x, broken, fake)[0])
    assert not torch.isfinite(sid_loss(x, broken, fake, 1.0))
    assert not torch.isfinite(dmd_loss(x, real, fake * float("inf"))[0])


def test_sid_loss_matches_a_direct_float64_computation():
    x, real, fake = stand_in_scores(3)
    alpha = 1.2
    x32 = x.float().requires_grad_()
    loss = sid_loss(x32, real.float(), fake.float(), alpha)
    real32, fake32, xr = real.float().double(), fake.float().double(), x32.detach().double()
    norm = (xr - real32).abs().mean(dim=(1, 2, 3, 4), keepdim=True)
    expected = ((real32 - fake32) * ((real32 - xr) - alpha * (real32 - fake32)) / norm).mean()
    assert loss.dtype == torch.float64 and torch.allclose(loss, expected, atol=1e-10)
    loss.backward()  # the normaliser carries no gradient: d/dx = -(real - fake) / norm / numel
    assert torch.allclose(x32.grad.double(), -(real32 - fake32) / norm / x.numel(), atol=1e-9)


def test_score_timesteps_are_shifted_and_lie_inside_the_clamp():
    config, _ = recipe()
    sampler = ScoreTimesteps.from_config(config)
    t = sampler.sample(20000, torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    assert t.shape == (20000,) and t.dtype == torch.float32
    assert float(t.min()) >= 20.0 and float(t.max()) <= 980.0
    assert float((t == 980.0).float().mean()) > 0.05  # the shift of 5 piles mass at high noise, clamped
    assert 600 < float(t.mean()) < 900  # unshifted U[0, 1000) would average 500
    with pytest.raises(UserError, match="min_score_timestep_ratio"):
        ScoreTimesteps.from_config(load_config(RECIPE, ["distill.min_score_timestep_ratio=0.9",
                                                        "distill.max_score_timestep_ratio=0.5"]))


def test_score_timestep_shift_is_the_flow_shift_unless_given():
    config, _ = recipe()
    assert ScoreTimesteps.from_config(config).shift == config.flow.timestep_shift  # published: one shift
    own = ScoreTimesteps.from_config(load_config(RECIPE, ["distill.score_timestep_shift=1.0"]))
    assert own.shift == 1.0
    t = own.sample(20000, torch.device("cpu"), generator=torch.Generator().manual_seed(0))
    assert 480 < float(t.mean()) < 520  # uniform over the clamp
    assert config.flow.timestep_shift == load_config(RECIPE, ["distill.score_timestep_shift=1.0"]).flow.timestep_shift
    with pytest.raises(UserError, match="'distill.score_timestep_shift' is 0.0: expected a positive shift"):
        load_config(RECIPE, ["distill.score_timestep_shift=0"])  # refused when the recipe loads, before any work


# --------------------------------------------------------------------------------------------- ODE regression
class KnowsTheAnswer:
    """A stand-in causal generator whose flow gives exactly the clean latent (or a fixed error)."""

    def __init__(self, clean, error=0.0):
        self.clean, self.error, self.timesteps = clean, error, []

    def forward_block_causal(self, x, timestep, context, num_frame_per_block, **mask):
        self.timesteps.append(timestep.clone())
        sigma = (timestep / 1000.0)[..., None, None, None]
        flow = torch.where(sigma > 0, (x - self.clean) / sigma.clamp_min(1e-12), torch.zeros_like(x))
        return flow + self.error


def ode_batch(geometry, first_frame=False):
    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 5, *geometry.latent_shape[1:], generator=g)
    batch = Batch(prompts=["a", "b"], context=torch.randn(2, 4, geometry.text_dim), ode_latents=latents,
                  ode_timesteps=torch.tensor([1000.0, 900.0, 700.0, 400.0, 0.0]))  # fmt: skip
    if first_frame:
        batch.first_frame = latents[:, -1, :1]
    if first_frame == "row 0":  # a batch of both tasks: only the first row holds its frame
        batch.first_frame_rows = torch.tensor([True, False])
    return batch


@pytest.mark.parametrize("first_frame", [False, True, "row 0"])
def test_ode_loss_is_zero_for_the_exact_clean_prediction_and_positive_otherwise(first_frame):
    config, resolved = recipe(path="configs/tiny/ode.yaml")
    # noisy points only, so every block's timestep can be checked below (clean context: the next test)
    objective = build_objective(load_config("configs/tiny/ode.yaml", ["train.ode_clean_context=false"]), resolved.geometry)
    assert isinstance(objective, OdeRegression) and not objective.has_critic
    batch = ode_batch(resolved.geometry, first_frame)
    clean = batch.ode_latents[:, -1]
    exact = KnowsTheAnswer(clean)
    loss, logs = objective.generator_loss(Models(generator=exact), batch)
    assert float(loss.detach()) < 1e-10 and logs["ode_loss"] < 1e-10
    # Each block sits at one stored noisy timestep; a given first frame is at t = 0 (in the rows holding it).
    timesteps = exact.timesteps[0]
    held = {False: [False, False], True: [True, True], "row 0": [True, False]}[first_frame]
    for row in range(2):
        for block in range(resolved.geometry.num_blocks):
            frames = timesteps[row, 3 * block : 3 * block + 3]
            frames = frames[1:] if (held[row] and block == 0) else frames
            assert len(set(frames.tolist())) == 1 and float(frames[0]) in (1000.0, 900.0, 700.0, 400.0)
        assert (float(timesteps[row, 0]) == 0.0) == held[row]
    if first_frame == "row 0":  # the other row's frame 0 is made and regressed; the held one is not counted
        off = clean.clone()
        off[1, 0] += 1.0
        loss, _ = objective.generator_loss(Models(generator=KnowsTheAnswer(off)), batch)
        frames = resolved.geometry.num_latent_frames
        assert float(loss.detach()) == pytest.approx(1.0 / (2 * frames - 1), rel=1e-4)  # one unit error, 2F - 1 frames
    wrong, _ = objective.generator_loss(Models(generator=KnowsTheAnswer(clean, error=0.1)), batch)
    assert float(wrong.detach()) > 1e-6
    with pytest.raises(UserError, match="ODE pairs"):
        objective.generator_loss(Models(generator=exact), Batch(["a"], torch.zeros(1, 4, 32)))


def test_ode_regression_trains_the_real_causal_model():
    config, resolved = recipe(path="configs/tiny/ode.yaml")
    generator = build_dit(resolved.generator, causal=True, attention_backend="sdpa")
    loss, _ = build_objective(config, resolved.geometry).generator_loss(Models(generator=generator), ode_batch(resolved.geometry))
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in generator.parameters())


def test_ode_refuses_an_independent_first_frame():
    config, resolved = recipe("video.num_frames=25", "rollout.independent_first_frame=true", path="configs/tiny/ode.yaml")
    with pytest.raises(UserError, match="independent_first_frame"):
        build_objective(config, resolved.geometry)


# --------------------------------------------------------------------------------------------- score distillation
class FixedFlow(torch.nn.Module):
    """A stand-in score whose flow is a fixed function of the input, optionally different on frame 0."""

    def __init__(self, frame0_offset=0.0):
        super().__init__()
        self.frame0_offset = frame0_offset

    def predict_flow(self, x, timestep, context):
        flow = 0.5 * x
        flow[:, 0] += self.frame0_offset
        return flow


def tiny_models(resolved, real=None, fake=None):
    generator = build_dit(resolved.generator, causal=True, attention_backend="sdpa")
    real = real or build_dit(resolved.real_score, causal=False, attention_backend="sdpa").requires_grad_(False)
    fake = fake or build_dit(resolved.critic, causal=False, attention_backend="sdpa")
    return Models(generator, real, fake)


def score_batch(geometry, first_frame=None):
    g = torch.Generator().manual_seed(1)
    return Batch(prompts=["a"], context=torch.randn(1, 4, geometry.text_dim, generator=g),
                 negative_context=torch.randn(1, 4, geometry.text_dim, generator=g), first_frame=first_frame)  # fmt: skip


@pytest.mark.parametrize("path, cls", [(RECIPE, DMD), ("configs/tiny/self_forcing_sid.yaml", SiD)])
def test_score_objectives_train_generator_and_critic_separately(path, cls):
    config, resolved = recipe(path=path)
    objective = build_objective(config, resolved.geometry)
    assert isinstance(objective, cls) and objective.has_critic
    models = tiny_models(resolved)
    batch = score_batch(resolved.geometry)
    torch.manual_seed(0)
    loss, logs = objective.generator_loss(models, batch)
    loss.backward()
    assert loss.dtype == torch.float64 and torch.isfinite(loss)
    assert 20.0 <= logs["score_timestep"] <= 980.0
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in models.generator.parameters())
    assert all(p.grad is None for p in models.critic.parameters())  # the scores are not trained by this loss
    models.generator.zero_grad(set_to_none=True)
    critic, critic_logs = objective.critic_loss(models, batch)
    critic.backward()
    assert float(critic.detach()) > 0 and critic_logs["critic_loss"] == pytest.approx(float(critic.detach()))
    assert all(p.grad is None for p in models.generator.parameters())  # the critic's sample is detached
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in models.critic.parameters())


def test_dmd_end_to_end_zero_when_real_equals_fake():
    # One network as both scores, with guidance that reduces to the conditional prediction (dmd form, g = 0).
    config, resolved = recipe("distill.guidance_scale=0.0")
    same = build_dit(resolved.real_score, causal=False, attention_backend="sdpa").requires_grad_(False)
    models = tiny_models(resolved, real=same, fake=same)
    loss, _ = build_objective(config, resolved.geometry).generator_loss(models, score_batch(resolved.geometry))
    loss.backward()
    assert float(loss.detach()) == 0.0
    assert all(p.grad is None or float(p.grad.abs().max()) == 0.0 for p in models.generator.parameters())


def test_ti2v_frame_zero_is_excluded_from_the_distribution_loss():
    # Real and fake scores differ only on frame 0: with a given first frame the loss sees no difference.
    config, resolved = recipe("distill.guidance_scale=0.0")
    models = tiny_models(resolved, real=FixedFlow(0.0), fake=FixedFlow(1.0))
    objective = build_objective(config, resolved.geometry)
    first = torch.randn(1, 1, *resolved.geometry.latent_shape[2:])
    loss_ti2v, _ = objective.generator_loss(models, score_batch(resolved.geometry, first_frame=first))
    loss_t2v, _ = objective.generator_loss(models, score_batch(resolved.geometry))
    assert float(loss_ti2v.detach()) == 0.0 and float(loss_t2v.detach()) > 0.0


def test_a_batch_of_both_tasks_scores_each_row_as_its_own_task():
    """Rows holding a first frame lose only on their made frames, the others on every frame, each group by its own
    distribution loss, weighted by rows; the held frame's score difference never enters the loss."""
    config, resolved = recipe("distill.guidance_scale=0.0", "video.task=ti2v", "train.image_share=0.5")
    g = resolved.geometry
    models = tiny_models(resolved, real=FixedFlow(0.0), fake=FixedFlow(1.0))
    objective = build_objective(config, g)
    seen = []
    original = objective.distribution_loss
    objective.distribution_loss = lambda x, real, fake: seen.append(tuple(x.shape[:2])) or original(x, real, fake)

    def mixed(rows):
        batch = score_batch(g, first_frame=torch.randn(2, 1, *g.latent_shape[2:]))
        batch.context, batch.negative_context = batch.context.expand(2, -1, -1), batch.negative_context.expand(2, -1, -1)
        batch.first_frame_rows = torch.tensor(rows)
        return batch

    def both(rows):
        seen.clear()
        return objective.generator_loss(models, mixed(rows))

    loss, logs = both([True, True])
    assert float(loss.detach()) == 0.0 and seen == [(2, g.num_latent_frames - 1)]  # every row holds it: one group
    assert logs["image_rows"] == 1.0
    loss, logs = both([True, False])
    assert seen == [(1, g.num_latent_frames - 1), (1, g.num_latent_frames)] and logs["image_rows"] == 0.5
    assert float(loss.detach()) > 0.0  # the text-to-video row's frame 0 is made, and its scores differ there
    critic, _ = objective.critic_loss(models, mixed([True, False]))
    assert torch.isfinite(critic)


def test_objective_without_critic_refuses_a_critic_step():
    config, resolved = recipe(path="configs/tiny/ode.yaml")
    with pytest.raises(UserError, match="no critic"):
        build_objective(config, resolved.geometry).critic_loss(Models(generator=None), ode_batch(resolved.geometry))


def test_ode_clean_context_draws_clean_blocks_without_loss():
    config, resolved = recipe(path="configs/tiny/ode.yaml")
    timesteps = torch.tensor([1000.0, 900.0, 700.0, 400.0, 0.0])
    with_clean = build_objective(config, resolved.geometry)  # the default: the published method
    noisy_only = build_objective(load_config("configs/tiny/ode.yaml", ["train.ode_clean_context=false"]), resolved.geometry)
    g = torch.Generator().manual_seed(0)
    draws = [with_clean.draw_points(timesteps, g) for _ in range(2000)]
    # the clean point is drawn uniformly with the others: 1 block in 5 (2 blocks x 2000 draws, +-4 sigma)
    rate = sum(d.count(4) for d in draws) / sum(len(d) for d in draws)
    assert abs(rate - 1 / 5) < 4 * (0.2 * 0.8 / 4000) ** 0.5, rate
    assert all(any(p != 4 for p in d) for d in draws)  # ... but never for every block
    assert all(4 not in noisy_only.draw_points(timesteps, g) for _ in range(200))  # the option: noisy points only
    # a clean block is context: the exact answer still gives zero loss, an error only counts on noisy blocks
    batch = ode_batch(resolved.geometry)
    clean = batch.ode_latents[:, -1]
    torch.manual_seed(3)
    loss, _ = with_clean.generator_loss(Models(generator=KnowsTheAnswer(clean)), batch)
    assert float(loss.detach()) < 1e-10


class RecordsInput(KnowsTheAnswer):
    """KnowsTheAnswer that also keeps the latents it was given."""

    def forward_block_causal(self, x, timestep, context, num_frame_per_block, **mask):
        self.inputs = x.clone()
        return super().forward_block_causal(x, timestep, context, num_frame_per_block, **mask)


def test_ode_teacher_forcing_regresses_one_block_per_sample_against_clean_context():
    config, resolved = recipe(path="configs/tiny/ode.yaml")
    g_ = resolved.geometry
    objective = build_objective(load_config("configs/tiny/ode.yaml", ["train.ode_teacher_forcing=true"]), g_)
    timesteps = torch.tensor([1000.0, 900.0, 700.0, 400.0, 0.0])
    # draws: every block and every noisy point, never the clean one, per sample
    g = torch.Generator().manual_seed(0)
    blocks, points = objective.draw_targets(timesteps, 4000, g)
    assert set(blocks) == set(range(g_.num_blocks)) and set(points) == {0, 1, 2, 3}
    assert abs(blocks.count(0) / 4000 - 1 / g_.num_blocks) < 0.03
    # the model sees: the target block at its point's latents and timestep, every other block at the clean point, t = 0
    batch = ode_batch(g_)
    latents, clean = batch.ode_latents, batch.ode_latents[:, -1]
    model = RecordsInput(clean)
    torch.manual_seed(5)
    loss, _ = objective.generator_loss(Models(generator=model), batch)
    assert float(loss.detach()) < 1e-10
    seen, frame_t = model.inputs, model.timesteps[0]
    block_of = torch.tensor([b for b, size in enumerate(g_.block_sizes) for _ in range(size)])
    for sample in range(seen.shape[0]):
        noisy_frames = frame_t[sample] != 0
        target_blocks = block_of[noisy_frames].unique()
        assert target_blocks.numel() == 1  # exactly one block is regressed ...
        assert torch.equal(noisy_frames, block_of == target_blocks[0])  # ... all of its frames
        point = int((timesteps == frame_t[sample][noisy_frames][0]).nonzero())
        assert torch.equal(seen[sample, noisy_frames], latents[sample, point, noisy_frames])
        assert torch.equal(seen[sample, ~noisy_frames], clean[sample, ~noisy_frames])  # clean context (and after)
    # the loss is the mean over the target frames only (frames at t = 0 would dilute it 3x): a flow error e
    # moves x0 by sigma * e on each target frame
    off = KnowsTheAnswer(clean, error=0.1)
    torch.manual_seed(5)
    loss, _ = objective.generator_loss(Models(generator=off), batch)
    sigma = off.timesteps[0].max(dim=1).values / 1000.0
    assert torch.allclose(loss.double(), ((sigma * 0.1) ** 2).mean().double(), rtol=1e-5)


def test_sid_differentiates_through_the_scores_so_it_is_not_dmd():
    # With the scores as constants, SiD at alpha = 1 has exactly DMD's gradient; SiD differentiates through them.
    grads = {}
    for path in (RECIPE, "configs/tiny/self_forcing_sid.yaml"):
        config, resolved = recipe(path=path)
        assert config.distill.sid_alpha == 1.0
        objective = build_objective(config, resolved.geometry)
        models = tiny_models(resolved)
        torch.manual_seed(0)
        loss, _ = objective.generator_loss(models, score_batch(resolved.geometry))
        loss.backward()
        assert all(p.grad is None for p in models.critic.parameters())
        assert all(p.grad is None for p in models.real_score.parameters())
        grads[type(objective).__name__] = torch.cat([p.grad.flatten() for p in models.generator.parameters()])
    assert not torch.allclose(grads["DMD"], grads["SiD"], rtol=1e-3, atol=1e-8)
