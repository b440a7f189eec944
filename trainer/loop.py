"""The one training loop: ODE regression, DMD and SiD differ only by the objective's two hooks.

An iteration trains the critic once (score distillation) and the generator when
iteration % distill.dfake_gen_update_ratio == 0 (every iteration for ODE regression). The loop is bounded by
train.max_steps, checkpoints every train.save_iters iterations, resumes from <logdir>/checkpoints/latest.txt,
and stops with a TrainingDiverged error after train.max_consecutive_nonfinite skipped iterations in a row.
"""
from __future__ import annotations

import contextlib
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from model.objective import frozen
from trainer.checkpoint import EXPORT_FOLDER, CheckpointManager, ModelAndOptimizer, full_state_dict, write_export
from trainer.evaluation import TrainingEvaluator, check_evaluation
from trainer.logger import TrainLogger, repair_metrics
from trainer.lora import merge_lora_state_dict
from trainer.run_folder import RunLock, check_same_recipe, recipe_identity
from trainer.setup import ObjectiveFactory, TrainingSetup, build_training
from trainer.steps import StepResult, injected_nan_steps, optimizer_step
from utils.config import Config, to_yaml
from utils.dist import DistInfo, barrier
from utils.errors import UserError
from utils.io import atomic_write_text
from utils.memory import MemoryProfiler, lifetime_peak_bytes
from utils.presets import arch_to_config_json

GIB = float(1 << 30)


class TrainingDiverged(RuntimeError):
    """Too many non-finite steps in a row (a training failure, not a user error: exit status 1)."""


@dataclass
class RunOptions:
    logdir: Path
    use_wandb: bool = False
    profile_memory: bool = False


class TrainState:
    """Counters and the data position, saved with the checkpoint (torch.distributed.checkpoint Stateful)."""

    def __init__(self, setup: TrainingSetup) -> None:
        self.sampler = setup.batches.sampler
        self.step = 0  # completed iterations
        self.generator_updates = 0
        self.critic_updates = 0
        self.nonfinite_skipped = 0
        self.consecutive_nonfinite = 0

    def state_dict(self) -> dict[str, Any]:
        counters = {k: getattr(self, k) for k in ("step", "generator_updates", "critic_updates", "nonfinite_skipped",
                                                  "consecutive_nonfinite")}
        return {**counters, "data": self.sampler.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for key in ("step", "generator_updates", "critic_updates", "nonfinite_skipped", "consecutive_nonfinite"):
            setattr(self, key, int(state[key]))
        self.sampler.load_state_dict(state["data"])


class Trainer:
    def __init__(self, config: Config, info: DistInfo, options: RunOptions, build_objective: ObjectiveFactory) -> None:
        from model.objective import Models

        self.config, self.info, self.options = config, info, options
        # 1. Before any model is built: one run per logdir, and a resume only with the recipe it was trained with.
        self.lock = RunLock(options.logdir).acquire() if info.is_main else None
        try:
            sp_size = config.parallel.sp_size
            self.checkpoints = CheckpointManager(options.logdir, config.train.keep_last, info.rank,
                                                 data_rank=info.rank // sp_size, writes_rng=info.rank % sp_size == 0)
            self.recipe_identity = recipe_identity(config)
            self.resume_steps, self.resume_warning = self.checkpoints.resume_candidates()
            if self.resume_steps:
                stored = self.checkpoints.recipe_of(self.resume_steps[0])
                if stored is not None:
                    where = f"{options.logdir} (checkpoint step {self.resume_steps[0]})"
                    check_same_recipe(stored, self.recipe_identity, where)
            check_evaluation(config)
            self.profiler = MemoryProfiler(options.profile_memory, info.device)
            self.setup = build_training(config, info, build_objective, self.profiler)
        except BaseException:
            self.release()
            raise
        setup = self.setup
        self.models = Models(generator=setup.generator, real_score=setup.real_score, critic=setup.critic)
        self.state = TrainState(setup)
        self.inject_nan = injected_nan_steps()
        # a single process has no FSDP2 policy to cast to bf16, so it autocasts instead
        single_bf16 = config.train.mixed_precision and info.world_size == 1
        device_type = info.device.type
        self.autocast: Callable[[], contextlib.AbstractContextManager] = (
            (lambda: torch.autocast(device_type, dtype=torch.bfloat16)) if single_bf16 else contextlib.nullcontext
        )
        self.evaluator = TrainingEvaluator(config, setup, self.autocast) if config.evaluation.every else None

    # ------------------------------------------------------------------------------------- state
    def _checkpoint_state(self) -> dict[str, Any]:
        setup = self.setup
        state: dict[str, Any] = {"train": self.state, "generator": ModelAndOptimizer(setup.generator, setup.generator_optimizer)}
        if setup.critic is not None:
            state["critic"] = ModelAndOptimizer(setup.critic, setup.critic_optimizer)
        if setup.ema is not None:
            state["ema"] = setup.ema
        return state

    def release(self) -> None:
        """Give up the logdir's lock (the end of the run, or a failure before it started)."""
        if self.lock is not None:
            self.lock.release()
            self.lock = None

    def _resume(self) -> None:
        """Load the newest loadable checkpoint; an unloadable one falls back to the one before, with a warning."""
        self.checkpoints.remove_partial()
        if self.resume_warning:
            self.log.message(f"warning: {self.resume_warning}")
        for position, step in enumerate(self.resume_steps):
            try:
                self.checkpoints.load(step, self._checkpoint_state())
            except Exception as err:  # noqa: BLE001 - DCP raises many types for damaged files
                reason = f"checkpoint step {step} cannot be loaded ({type(err).__name__}: {str(err).splitlines()[0][:200]})"
                if position + 1 == len(self.resume_steps):
                    raise UserError(f"{reason}, and no earlier complete checkpoint exists: remove "
                                    f"{self.checkpoints.root} to train from the start") from None
                self.log.message(f"warning: {reason}; trying step {self.resume_steps[position + 1]}")
                continue
            self.log.message(f"resumed from {self.options.logdir / 'checkpoints'} at step {self.state.step}")
            return

    def _export_weights(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        weights = full_state_dict(model)
        if self.config.train.lora_rank:
            weights = merge_lora_state_dict(weights, self.config.train.lora_rank, self.config.train.lora_alpha)
        return weights

    def save(self) -> None:
        """Checkpoint (collective) and refresh the inference export in <logdir>/latest/."""
        step = self.state.step
        self.checkpoints.save(step, self._checkpoint_state(), self.recipe_identity)
        weights = {"generator": self._export_weights(self.setup.generator)}
        ema = self.setup.ema
        if ema is not None and ema.started:
            with ema.swapped_in():
                weights["generator_ema"] = self._export_weights(self.setup.generator)
        if self.info.is_main:
            config_json = arch_to_config_json(self.setup.recipe.generator.arch)
            write_export(self.options.logdir / EXPORT_FOLDER, weights, config_json, to_yaml(self.config))
        barrier()

    # ------------------------------------------------------------------------------------- steps
    def train_step(self, name: str, step: int) -> StepResult:
        setup, objective = self.setup, self.setup.objective
        is_generator = name == "generator"
        model = setup.generator if is_generator else setup.critic
        optimizer = setup.generator_optimizer if is_generator else setup.critic_optimizer
        hook = objective.generator_loss if is_generator else objective.critic_loss
        first = (setup.generator_optimizer if is_generator else setup.critic_optimizer).state == {}
        phase = self.profiler.phase(f"{name}_step") if first else contextlib.nullcontext()
        # the generator step trains the generator alone: the critic stays frozen through forward and backward
        freeze = frozen(setup.critic) if is_generator and setup.critic is not None else contextlib.nullcontext()
        with phase, freeze:
            return optimizer_step(
                model, optimizer, lambda batch: hook(self.models, batch), setup.batches.next,
                micro_steps=setup.micro_steps, grad_clip=self.config.optim.grad_clip, autocast=self.autocast,
                inject_nan=step in self.inject_nan,
            )  # fmt: skip

    def _iteration(self, step: int) -> dict[str, float]:
        """One iteration: the generator (on its turn), then the critic; returns the step's metrics."""
        setup, state = self.setup, self.state
        results: dict[str, StepResult] = {}
        alone = not setup.objective.has_critic
        # 1. Generator step on its turn (every step when it trains alone); EMA follows an applied update.
        if alone or step % self.config.distill.dfake_gen_update_ratio == 0:
            results["generator"] = self.train_step("generator", step)
            if results["generator"].applied:
                state.generator_updates += 1
                if setup.ema is not None:
                    setup.ema.update(step)
        # 2. Critic step every iteration of score distillation.
        if setup.critic is not None:
            results["critic"] = self.train_step("critic", step)
            state.critic_updates += int(results["critic"].applied)
        # 3. The NaN/Inf guard: a skipped iteration is counted; too many in a row stop the run.
        if all(r.applied for r in results.values()):
            state.consecutive_nonfinite = 0
        else:
            state.nonfinite_skipped += 1
            state.consecutive_nonfinite += 1
        metrics: dict[str, float] = {}
        for name, result in results.items():
            metrics.update({f"{name}_loss": result.loss, f"{name}_grad_norm": result.grad_norm})
            metrics.update({f"{name}/{k}": v for k, v in result.logs.items()})
        return metrics

    # ------------------------------------------------------------------------------------- loop
    def train(self) -> None:
        config, info, setup = self.config, self.info, self.setup
        # distinct noise per data-parallel rank (a sequence group draws alike: it shares one sample); restored on resume
        data_rank = setup.data_parallel.rank
        torch.manual_seed(config.train.seed + data_rank)
        random.seed(config.train.seed + data_rank)
        self.log = TrainLogger(self.options.logdir, is_main=info.is_main, config=config, use_wandb=self.options.use_wandb,
                               start_step=0, max_steps=config.train.max_steps)
        self._resume()  # before anything is written into the logdir: a failed resume leaves it as it was
        if info.is_main:
            dropped = repair_metrics(self.log.metrics_path, self.state.step)
            if dropped:
                self.log.message(f"metrics.jsonl: dropped {dropped} line(s) after step {self.state.step} or half-written")
            atomic_write_text(self.options.logdir / "config.yaml", to_yaml(config))
        samples_per_step = config.train.batch_size * setup.data_parallel.size * setup.micro_steps
        limit = config.train.max_consecutive_nonfinite
        window: list[float] = []
        window_metrics: dict[str, list[float]] = {}  # every metric averaged over the logging window
        try:
            for step in range(self.state.step, config.train.max_steps):
                started = time.perf_counter()
                metrics = self._iteration(step)
                seconds = time.perf_counter() - started
                self.state.step = done = step + 1
                window.append(seconds)
                for key, value in metrics.items():
                    window_metrics.setdefault(key, []).append(value)
                self.log.advance(done, {k: v for k, v in metrics.items() if k.endswith("_loss") and "/" not in k})
                diverged = self.state.consecutive_nonfinite >= limit
                if diverged or done % config.train.log_iters == 0 or done == config.train.max_steps:
                    mean_seconds = sum(window) / len(window)
                    means = {k: sum(v) / len(v) for k, v in window_metrics.items()}
                    window.clear()
                    window_metrics.clear()
                    self.log.log(done, {
                        **means,
                        "lr": setup.generator_optimizer.param_groups[0]["lr"],
                        **({"lr_critic": setup.critic_optimizer.param_groups[0]["lr"]} if setup.critic_optimizer else {}),
                        "seconds_per_step": mean_seconds,
                        "tokens_per_s": samples_per_step * setup.geometry.seq_len / mean_seconds,
                        "peak_memory_gb": lifetime_peak_bytes(info.device) / GIB,
                        "generator_updates": self.state.generator_updates,
                        "critic_updates": self.state.critic_updates,
                        "nonfinite_skipped": self.state.nonfinite_skipped,
                    })  # fmt: skip
                if self.evaluator is not None and self.evaluator.due(done) and not diverged:
                    self.log.log(done, self.evaluator.run())
                if diverged:  # the run stops before saving: the last checkpoint holds the last good weights
                    raise TrainingDiverged(
                        f"{limit} iterations in a row had a NaN/Inf loss or gradient (last at step {step}); "
                        f"stopped, the last good checkpoint is in {self.options.logdir / 'checkpoints'}"
                    )
                if done % config.train.save_iters == 0 or done == config.train.max_steps:
                    self.save()
        finally:
            self.log.close()
            if self.options.profile_memory and info.is_main:
                self.profiler.save(self.options.logdir / "memory_events.json")
            self.release()
