"""Run under torchrun (gloo, N CPU ranks, one sequence group): every DiT entry with Ulysses sequence parallelism
against the same model without it, in the same process. Writes {case: {outputs, gradients}} max differences.

    torchrun --nproc_per_node=2 tests/sp_worker.py OUT.json
"""
from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist

from pipeline.components import build_dit
from pipeline.rollout import BlockRollout
from utils.config import load_config
from utils.geometry import resolve_recipe
from wan.modules.sequence_parallel import SequenceParallel

RECIPE = "configs/tiny/self_forcing_dmd.yaml"


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.detach() - b.detach()).abs().max())


def gradients(model) -> dict[str, torch.Tensor]:
    return {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}


def group_sum(grads: dict[str, torch.Tensor], size: int) -> dict[str, torch.Tensor]:
    """The group's gradient: partial gradients summed over the ranks, over `size` (each rank's loss is the same)."""
    out = {}
    for name, grad in grads.items():
        grad = grad.clone()
        dist.all_reduce(grad)
        out[name] = grad / size
    return out


def compare(run, model, sp: SequenceParallel) -> dict:
    """run(model) -> (output, loss); once whole, once sequence-parallel, same inputs and RNG."""
    results = []
    for parallel in (None, sp):
        model.set_sequence_parallel(parallel)
        model.zero_grad(set_to_none=True)
        torch.manual_seed(11)
        output, loss = run(model)
        if loss is not None:
            loss.backward()
        grads = gradients(model)
        results.append((output, group_sum(grads, sp.size) if parallel is not None else grads))
    model.set_sequence_parallel(None)
    (whole, whole_grads), (split, split_grads) = results
    out = {"output": max_diff(whole, split), "output_scale": float(whole.abs().max())}
    if whole_grads:
        assert whole_grads.keys() == split_grads.keys(), "the sequence-parallel run left parameters without gradient"
        out["gradient"] = max(max_diff(whole_grads[n], split_grads[n]) / (whole_grads[n].abs().max().item() + 1e-12)
                              for n in whole_grads)
        out["num_gradients"] = len(whole_grads)
    return out


def main(out_path: str) -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    sp = SequenceParallel.from_group(dist.group.WORLD)
    config = load_config(RECIPE, ["rollout.local_attn_size=6", "rollout.sink_size=3", "video.num_frames=33"])
    recipe = resolve_recipe(config)
    geometry = recipe.geometry
    g = torch.Generator().manual_seed(0)
    _, frames, channels, height, width = geometry.latent_shape
    noise = torch.randn(2, frames, channels, height, width, generator=g)
    context = torch.randn(2, 5, geometry.text_dim, generator=g)
    weights = torch.randn(noise.shape, generator=g)
    results = {}

    teacher = build_dit(recipe.real_score, causal=False, attention_backend="sdpa")
    per_frame = torch.rand(2, frames, generator=g) * 1000

    def bidirectional(model):
        out = model.predict_flow(noise, per_frame, context)
        return out, (out * weights).sum()
    results["predict_flow"] = compare(bidirectional, teacher, sp)

    per_token = torch.rand(2, geometry.seq_len, generator=g) * 1000
    results["predict_flow_per_token_timestep"] = compare(
        lambda m: (lambda o: (o, (o * weights).sum()))(m.predict_flow(noise, per_token, context)), teacher, sp)
    with torch.no_grad():
        results["predict_flow_no_grad"] = compare(lambda m: (m.predict_flow(noise, per_frame, context), None), teacher, sp)

    student = build_dit(recipe.generator, causal=True, attention_backend="sdpa")
    results["forward_block_causal_window_sink"] = compare(
        lambda m: (lambda o: (o, (o * weights).sum()))(m.forward_block_causal(
            noise, per_frame, context, 3, window_frames=6, sink_frames=3)), student, sp)

    rollout = BlockRollout.from_config(config, geometry)
    with torch.no_grad():
        results["rollout_inference_rolling_cache"] = compare(lambda m: (rollout.run(m, noise, context).latents, None),
                                                             student, sp)
    exits = [1, 3, 0, 2, 3][: geometry.num_blocks]

    def training_rollout(model):
        latents = rollout.run(model, noise, context, exit_steps=exits).latents
        return latents, (latents * weights).sum()
    results["rollout_training_exit_steps"] = compare(training_rollout, student, sp)

    if dist.get_rank() == 0:
        with open(out_path, "w") as handle:
            json.dump({"world": sp.size, "blocks": geometry.num_blocks, "cases": results}, handle, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
