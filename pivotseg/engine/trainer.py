"""The iteration-based training loop on accelerate.

One loop covers 1 CPU, 1 GPU, N GPUs and several nodes (started by ``torchrun``). A model only
needs ``compute_loss(images, labels) -> (loss, parts)``; ``param_groups(lr, weight_decay)`` and
``trainable_state_dict()`` are used when it has them (:class:`pivotseg.segmenter.Segmenter`
does). What one optimiser step sees is fixed by the global batch, whatever the number of
processes (:func:`~pivotseg.engine.optim.accumulation_steps`), and the data order is a function
of the iteration (:mod:`~pivotseg.engine.sampler`), so a resumed run repeats an uninterrupted
one exactly.
"""

from __future__ import annotations

import math
import signal
import threading
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from pivotseg.engine import checkpoint as ckpt
from pivotseg.engine.distributed import all_gather_objects, barrier, make_accelerator
from pivotseg.engine.optim import accumulation_steps, build_optimizer, default_param_groups
from pivotseg.engine.run_folder import RunFolder, collect_env
from pivotseg.engine.sampler import ClassBalancedSampler, ClassDraw, InfiniteSampler, SeededItems
from pivotseg.engine.schedule import build_scheduler
from pivotseg.engine.workers import next_batch
from pivotseg.errors import ConfigError, PivotsegError

EvaluateFn = Callable[[nn.Module, int], dict]


class NonFiniteLoss(PivotsegError):
    """The loss became NaN or infinite; the run stopped without applying that step."""


class TrainingStopped(PivotsegError):
    """Ctrl-C or SIGTERM: a checkpoint was saved and the message says how to resume."""


class _LossForward(nn.Module):
    """Routes ``compute_loss`` through ``forward`` so that DDP sees (and syncs) the pass."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, images: torch.Tensor, labels: torch.Tensor):
        return self.model.compute_loss(images, labels)


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (each process its own seed)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def seed_worker(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: seed Python and NumPy from the worker's torch seed."""
    import random

    import numpy as np

    seed = torch.initial_seed() % 2**32
    random.seed(seed)
    np.random.seed(seed)


class Trainer:
    """Trains ``model`` on ``train_set`` as ``train_cfg`` says; see :meth:`fit`.

    Args:
        model: the module to train (trainable parameters already chosen by ``requires_grad``).
        train_cfg: a :class:`pivotseg.config.TrainConfig` (or anything with its attributes).
        train_set: yields dicts with ``image`` (3, H, W) and ``label`` (H, W) tensors.
        run_dir: the run folder (checkpoints, metrics).
        seed: run seed (data order, augmentation, per-rank generators).
        collate_fn: batches items (default: torch's ``default_collate``).
        num_workers: DataLoader worker processes.
        evaluate: ``fn(model, iteration) -> record`` run on every process at ``eval_every``
            and at the end; the record (e.g. mIoU per target) is logged by the main process.
        save_model: ``fn(folder)`` writing the model files of a checkpoint (default: the
            trainable tensors as ``model.safetensors``).
        accelerator: an :class:`accelerate.Accelerator`; built from ``train_cfg`` if omitted.
        resume_hint: the command line printed to resume after a stop.
        class_sampling: draws ``(index, class)`` per sample (rare-class sampling, e.g.
            :class:`pivotseg.data.rare_classes.RareClassSampling`); ``None``: epochs of
            shuffled indices.
    """

    def __init__(
        self,
        model: nn.Module,
        train_cfg: Any,
        train_set: Dataset,
        run_dir: str | Path,
        *,
        seed: int = 0,
        collate_fn: Callable | None = None,
        num_workers: int = 0,
        evaluate: EvaluateFn | None = None,
        save_model: Callable[[Path], None] | None = None,
        accelerator=None,
        resume_hint: str | None = None,
        class_sampling: ClassDraw | None = None,
    ):
        self.cfg = train_cfg
        self.class_sampling = class_sampling
        self.model = model
        self.train_set = train_set
        self.seed = seed
        self.collate_fn = collate_fn
        self.num_workers = num_workers
        self.evaluate_fn = evaluate
        self.save_model = save_model or (lambda folder: ckpt.save_trainable(model, folder))
        self.accelerator = accelerator or make_accelerator(
            train_cfg.mixed_precision, getattr(train_cfg, "find_unused_parameters", False)
        )
        acc = self.accelerator
        self.rank, self.world_size = acc.process_index, acc.num_processes
        self.is_main = acc.is_main_process
        self.run = RunFolder(run_dir, active=self.is_main)
        self.run_dir = Path(run_dir)
        self.resume_hint = resume_hint or (
            f"pivotseg train {self.run_dir}/config.yaml --resume {self.run_dir}"
        )
        self.per_device_batch, self.accumulation = accumulation_steps(
            train_cfg.global_batch_size, self.world_size, train_cfg.per_device_batch_size
        )
        self.last_checkpoint: Path | None = None
        self._stop_requested = False

    # ----- set-up --------------------------------------------------------------------------
    def _param_groups(self) -> list[dict]:
        lr, wd = self.cfg.lr, self.cfg.weight_decay
        if hasattr(self.model, "param_groups"):
            return self.model.param_groups(lr, wd)
        return default_param_groups(self.model, lr, wd)

    def _loader(self, start_iteration: int, seed: int | None = None) -> DataLoader:
        per_step = self.accumulation * self.per_device_batch
        seed = self.seed if seed is None else seed
        stream = dict(
            seed=seed, rank=self.rank, world_size=self.world_size, start=start_iteration * per_step
        )
        if self.class_sampling is not None:
            sampler = ClassBalancedSampler(self.class_sampling, **stream)
        else:
            sampler = InfiniteSampler(len(self.train_set), **stream)
        # An own generator: creating the loader's iterator must not consume the global torch
        # generator, whose state is part of what a resume restores.
        generator = torch.Generator().manual_seed(seed * 1009 + self.rank)
        kwargs = {}
        if self.num_workers > 0:
            kwargs = dict(persistent_workers=True, prefetch_factor=2)
        return DataLoader(
            SeededItems(self.train_set),
            batch_size=self.per_device_batch,
            sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=self.collate_fn,
            worker_init_fn=seed_worker,
            generator=generator,
            pin_memory=self.accelerator.device.type == "cuda",
            drop_last=True,
            **kwargs,
        )

    def _warm_up(self) -> None:
        """Run the model's warm-up (e.g. DPFT's pivot initialisation) before a fresh start.

        ``model.warmup_images`` source images, split over the processes, drawn in an order of
        their own (seed + 1) so that the training data order stays that of a run without
        warm-up; its results are buffers, saved with the model, so a resume skips it.
        """
        wanted = int(getattr(self.model, "warmup_images", 0) or 0)
        if wanted <= 0 or not hasattr(self.model, "warm_up"):
            return
        steps = math.ceil(math.ceil(wanted / self.world_size) / self.per_device_batch)
        loader = iter(self._loader(0, seed=self.seed + 1))
        device = self.accelerator.device
        try:
            for _ in tqdm(range(steps), desc="warm-up", disable=not self.is_main):
                batch = next_batch(loader)
                self.model.warm_up(batch["image"].to(device), batch["label"].to(device))
        finally:
            del loader

    def _install_signal_handlers(self):
        if threading.current_thread() is not threading.main_thread():
            return {}

        def request_stop(signum, frame):
            if self._stop_requested:  # a second Ctrl-C stops at once, without saving
                raise KeyboardInterrupt
            self._stop_requested = True
            if self.is_main:
                tqdm.write("pivotseg: stopping after this iteration (checkpoint follows)")

        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, request_stop)
        return previous

    # ----- checkpoints -----------------------------------------------------------------------
    def save_checkpoint(self, iteration: int, optimizer, scheduler) -> Path:
        """Write ``checkpoints/iter_XXXXXXX`` and point ``checkpoints/last`` at it (collective)."""
        rng_states = all_gather_objects(ckpt.capture_rng())
        folder = self.run.checkpoints / f"iter_{iteration:07d}"
        if self.is_main:
            scaler = self.accelerator.scaler
            state = {
                "iteration": iteration,
                "world_size": self.world_size,
                "global_batch_size": self.cfg.global_batch_size,
                "seed": self.seed,
                "scheduler": scheduler.state_dict(),
                "scaler": scaler.state_dict() if scaler is not None else None,
            }
            ckpt.save_checkpoint(
                folder,
                save_model=self.save_model,
                optimizer=optimizer,
                trainer_state=state,
                rng_states=rng_states,
            )
            ckpt.link_checkpoint(folder, self.run.checkpoints / "last")
        barrier()
        self.last_checkpoint = folder
        return folder

    def _resume(self, folder: Path, optimizer, scheduler) -> int:
        state, optim_state, rng_states = ckpt.load_checkpoint_state(folder)
        if state["global_batch_size"] != self.cfg.global_batch_size:
            warnings.warn(
                f"{folder}: saved with global batch {state['global_batch_size']}, resuming with "
                f"{self.cfg.global_batch_size}; the data order will differ from the original run",
                stacklevel=2,
            )
        ckpt.load_trainable(self.model, folder)
        optimizer.load_state_dict(optim_state)
        scheduler.load_state_dict(state["scheduler"])
        if state.get("scaler") and self.accelerator.scaler is not None:
            self.accelerator.scaler.load_state_dict(state["scaler"])
        if self.rank < len(rng_states):
            ckpt.restore_rng(rng_states[self.rank])
        else:
            warnings.warn(
                f"{folder}: saved by {len(rng_states)} processes; process {self.rank} starts "
                "from a fresh seed, so this resume is not bit-exact",
                stacklevel=2,
            )
            seed_all(self.seed + self.rank)
        self.last_checkpoint = folder
        return int(state["iteration"])

    # ----- the loop ----------------------------------------------------------------------------
    def fit(self, resume: str | Path | None = None, stop_at: int | None = None) -> dict:
        """Train to ``train_cfg.iterations``; returns the last evaluation record (or ``{}``).

        Args:
            resume: a checkpoint folder to continue from (model, optimiser, schedule, random
                state and data position).
            stop_at: stop (with a checkpoint) after this iteration although the schedule runs
                to ``train_cfg.iterations``, e.g. to fit a cluster job's time limit.

        Raises:
            NonFiniteLoss: the loss became NaN/inf (names the iteration and last checkpoint).
            TrainingStopped: Ctrl-C or SIGTERM; a checkpoint was saved first.
        """
        cfg, acc = self.cfg, self.accelerator
        total = cfg.iterations
        optimizer = build_optimizer(
            self._param_groups(),
            cfg.lr,
            cfg.weight_decay,
            cfg.betas,
            name=getattr(cfg, "optimizer", "adamw"),
            momentum=getattr(cfg, "momentum", 0.9),
        )
        scheduler = build_scheduler(
            optimizer,
            total,
            warmup_iters=cfg.warmup_iters,
            warmup_ratio=cfg.warmup_ratio,
            power=cfg.poly_power,
            min_ratio=cfg.min_lr / cfg.lr if cfg.lr else 0.0,
        )
        wrapped, optimizer = acc.prepare(_LossForward(self.model), optimizer)
        trainable = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

        start = 0
        if resume is not None:
            start = self._resume(ckpt.resolve_checkpoint(resume), optimizer, scheduler)
            self.run.truncate_metrics(start)
        else:
            self._warm_up()
            # Dropout and other model randomness differ per process; data randomness is
            # per sample (SeededItems), so it does not depend on this. Python's and NumPy's
            # generators too: left unseeded they start from OS entropy, and the checkpoint's
            # rng.safetensors would differ between two runs of one config.
            seed_all(self.seed + self.rank)
        env = collect_env(self.world_size, acc.mixed_precision)
        self.run.write_env(env, name="env.json" if start == 0 else f"env_resume_{start}.json")
        if start >= total:
            return {}

        loader_iter = iter(self._loader(start))
        wrapped.train()
        previous_handlers = self._install_signal_handlers()
        progress = tqdm(
            total=total, initial=start, disable=not self.is_main, desc="train", dynamic_ncols=True
        )
        window: dict[str, float] = {}
        window_count, window_start = 0, time.perf_counter()
        last_eval: dict = {}
        try:
            for it in range(start, total):
                loss_sum, parts_sum = self._step(wrapped, loader_iter, trainable, it == start)
                # One reduction per step carries the loss (for logging and the NaN check) and
                # the stop request, so all processes stop at the same iteration.
                flags = torch.tensor(
                    [loss_sum, float(self._stop_requested)], device=acc.device, dtype=torch.float64
                )
                flags = acc.reduce(flags, reduction="sum")
                loss = flags[0].item() / self.world_size
                if not math.isfinite(loss):
                    optimizer.zero_grad(set_to_none=True)
                    raise NonFiniteLoss(
                        f"loss is {loss} at iteration {it + 1}; last good checkpoint: "
                        f"{self.last_checkpoint or 'none saved yet'}; lower train.lr or set "
                        f"train.grad_clip, then resume with: {self.resume_hint}"
                    )
                if cfg.grad_clip:
                    acc.clip_grad_norm_([p for _, p in trainable], cfg.grad_clip)
                optimizer.step()
                lr = scheduler.get_last_lr()[0]
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                done = it + 1
                progress.update(1)

                window["loss"] = window.get("loss", 0.0) + loss
                for key, value in parts_sum.items():
                    window[key] = window.get(key, 0.0) + value
                window_count += 1
                if done % cfg.log_every == 0 or done == total:
                    record = {k: v / window_count for k, v in window.items()}
                    elapsed = time.perf_counter() - window_start
                    record.update(lr=lr, sec_per_iter=elapsed / window_count)
                    self.run.log(record, done)
                    progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}")
                    window, window_count, window_start = {}, 0, time.perf_counter()

                final = done == total
                if self.evaluate_fn is not None and (
                    final or (cfg.eval_every and done % cfg.eval_every == 0)
                ):
                    last_eval = self._evaluate(wrapped, done)
                stopping = flags[1].item() > 0 or (stop_at is not None and done >= stop_at)
                if final or stopping or (cfg.checkpoint_every and done % cfg.checkpoint_every == 0):
                    self._check_finite_weights(trainable, done)
                    self.save_checkpoint(done, optimizer, scheduler)
                if flags[1].item() > 0 and not final:
                    raise TrainingStopped(
                        f"stopped at iteration {done} of {total}; saved {self.last_checkpoint}; "
                        f"resume with: {self.resume_hint}"
                    )
                if stopping:
                    if not final and self.is_main:
                        tqdm.write(
                            f"pivotseg: stopped at iteration {done} of {total} as asked; saved "
                            f"{self.last_checkpoint}; resume with: {self.resume_hint}"
                        )
                    break
        finally:
            progress.close()
            for sig, handler in previous_handlers.items():
                signal.signal(sig, handler)
            self.run.close()
            del loader_iter
        return last_eval

    def _step(self, wrapped, loader_iter, trainable, first: bool) -> tuple[float, dict]:
        """Forward/backward over ``accumulation`` micro-batches; returns mean loss and parts."""
        acc = self.accelerator
        loss_sum, parts_sum = 0.0, {}
        for micro in range(self.accumulation):
            batch = next_batch(loader_iter)
            images = batch["image"].to(acc.device, non_blocking=True)
            labels = batch["label"].to(acc.device, non_blocking=True)
            # Only the last micro-batch synchronises gradients across processes.
            last = micro == self.accumulation - 1
            with nullcontext() if last else acc.no_sync(wrapped):
                loss, parts = wrapped(images, labels)
                acc.backward(loss / self.accumulation)
            loss_sum += loss.detach().float().item() / self.accumulation
            for key, value in (parts or {}).items():
                value = float(value)
                parts_sum[key] = parts_sum.get(key, 0.0) + value / self.accumulation
        if first:
            self._check_all_trained(trainable)
        return loss_sum, parts_sum

    def _check_finite_weights(self, trainable, iteration: int) -> None:
        """Never save a checkpoint one could not resume from (a step can overflow weights)."""
        bad = [n for n, p in trainable if not torch.isfinite(p).all()]
        if bad:
            raise NonFiniteLoss(
                f"weights became non-finite at iteration {iteration} (e.g. {bad[0]}); last good "
                f"checkpoint: {self.last_checkpoint or 'none saved yet'}; lower train.lr or set "
                f"train.grad_clip, then resume with: {self.resume_hint}"
            )

    def _check_all_trained(self, trainable) -> None:
        unused = [n for n, p in trainable if p.grad is None]
        if not unused:
            return
        message = (
            f"{len(unused)} trainable parameters got no gradient (e.g. {', '.join(unused[:3])})"
        )
        if self.world_size > 1 and not getattr(self.cfg, "find_unused_parameters", False):
            raise ConfigError(
                message + "; DDP needs every one to be used: set train.find_unused_parameters=true"
            )
        warnings.warn(message, stacklevel=3)

    def _evaluate(self, wrapped, iteration: int) -> dict:
        wrapped.eval()
        try:
            record = self.evaluate_fn(self.model, iteration)
        finally:
            wrapped.train()
        self.run.log({"eval": record}, iteration)
        if self.is_main and isinstance(record, dict) and "mean_miou" in record:
            tqdm.write(f"iteration {iteration}: mean mIoU {record['mean_miou']:.2f}")
        return record
