"""The training stage: DDP over the global P x K batch, checkpointed and resumable.

Exactness under DDP: each rank embeds its slice of the global batch, the slices are
all-gathered (the local one keeping its gradient) and the loss is computed on the
whole batch, as one process would. Back-propagating ``world_size * loss`` gives each
rank the gradient of its own samples times N, and DDP's gradient averaging then
yields exactly the single-process gradient.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel as DDP

from imret import checkpoint as ckpt_lib
from imret import selection as select_lib
from imret import stopping
from imret.config import ExperimentConfig, OptimConfig, ScheduleConfig
from imret.data.loader import TrainData
from imret.distributed import DistInfo, barrier, gather_with_grad
from imret.losses import Criterion, build_criterion
from imret.models import build_model
from imret.models.embedding import EmbeddingNet
from imret.rundir import RunDir
from imret.selection import Selection
from imret.tb import Board, make_board


class NonFiniteLoss(RuntimeError):
    """The loss became NaN or infinite; training stops rather than corrupting the weights."""


class Trainee(nn.Module):
    """The model and its loss in one module, so DDP sees every trained parameter."""

    def __init__(self, model: EmbeddingNet, criterion: Criterion, info: DistInfo, loss_fp32: bool = True) -> None:
        super().__init__()
        self.model, self.criterion, self.info, self.loss_fp32 = model, criterion, info, loss_fp32

    def forward(self, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        embeddings = gather_with_grad(self.model(images).float(), self.info)
        all_labels = gather_with_grad(labels, self.info)
        # Under autocast, the float32 embeddings would be cast back down inside the loss's matmuls.
        full = torch.autocast(embeddings.device.type, enabled=False) if self.loss_fp32 else contextlib.nullcontext()
        with full:
            return self.criterion(embeddings, all_labels)


def param_groups(model: EmbeddingNet, criterion: nn.Module, optim: OptimConfig) -> list[dict[str, Any]]:
    """Backbone at the base lr, heads and loss parameters at lr * head_lr_mult; no decay on 1-D tensors
    unless ``optim.decay_1d``; frozen parameters left out."""
    head_ids = {id(p) for p in model.head_parameters()} | {id(p) for p in criterion.parameters()}
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for p in list(model.parameters()) + list(criterion.parameters()):
        if p.requires_grad:
            groups.setdefault((id(p) in head_ids, p.ndim <= 1 and not optim.decay_1d), []).append(p)
    out = []
    for (is_head, no_decay), params in sorted(groups.items()):
        out.append({
            "params": params, "name": ("head" if is_head else "backbone") + ("_no_decay" if no_decay else ""),
            "lr": optim.lr * (optim.head_lr_mult if is_head else 1.0),
            "weight_decay": 0.0 if no_decay else optim.weight_decay,
        })
    return out


def check_classifier_size(cfg: ExperimentConfig, num_classes: int, labelled_classes: int) -> None:
    """ValueError naming the fix when a loss's fixed classifier has fewer classes than the labels need.

    Pseudo-labels are numbered after the labelled classes, so a classifier sized for one
    iteration (the PSS seed's 1024) can be too small for the pseudo-classes of the next.
    """
    for i, term in enumerate(cfg.loss.terms):
        fixed = term.params.get("num_classes")
        if fixed is None or fixed >= num_classes:
            continue
        pseudo = (f" ({labelled_classes} labelled classes + {num_classes - labelled_classes} pseudo-classes from "
                  f"{cfg.data.pseudo_labels})" if cfg.data.pseudo_labels else "")
        raise ValueError(
            f"loss.terms[{i}] ({term.name}): the classifier has num_classes={fixed}, but the training labels need "
            f"{num_classes}{pseudo}. Give it room with --set loss.terms.{i}.params.num_classes={num_classes} (and "
            f"--force, since the run's config changes), or drop num_classes so that the classifier follows the labels."
        )


def build_optimizer(groups: list[dict[str, Any]], optim: OptimConfig) -> torch.optim.Optimizer:
    if optim.name == "sgd":
        return torch.optim.SGD(groups, lr=optim.lr, momentum=optim.momentum)
    cls = torch.optim.AdamW if optim.name == "adamw" else torch.optim.Adam
    return cls(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps)  # type: ignore[arg-type]


def lr_factor(sched: ScheduleConfig, epoch: float, epochs: int, base_lr: float) -> float:
    """The learning-rate multiplier at a (fractional) epoch."""
    whole = math.floor(epoch + 1e-9)
    if sched.name == "step":
        factor = sched.gamma ** (whole // sched.step_size)
    elif sched.name == "multistep":
        factor = sched.gamma ** sum(whole >= m for m in sched.milestones)
    elif sched.name == "exponential":
        factor = sched.gamma ** whole
    elif sched.name == "cosine":
        floor = sched.min_lr / base_lr if base_lr else 0.0
        factor = floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(epoch / epochs, 1.0)))
    else:
        factor = 1.0
    if sched.warmup_epochs > 0:
        factor *= min(1.0, epoch / sched.warmup_epochs)
    return factor


@dataclass
class Position:
    """Where training stands: the next (epoch, step) to run and batch steps done in total."""

    epoch: int = 0
    step: int = 0
    global_step: int = 0


class Training:
    """All the stateful parts of one training run."""

    def __init__(self, cfg: ExperimentConfig, run: RunDir, info: DistInfo) -> None:
        if cfg.model.batchnorm == "sync" and info.backend != "nccl":
            raise ValueError("model.batchnorm=sync needs GPUs (torch's SyncBatchNorm is GPU-only); use train or frozen on CPU")
        self.cfg, self.run, self.info = cfg, run, info
        self.device = info.device
        torch.manual_seed(cfg.train.seed)  # the same initial weights on every rank and in every run
        self.data = TrainData(cfg, info)
        self.model = build_model(cfg.model)
        if cfg.train.init_from:
            ckpt_lib.load_init_weights(self.model, cfg.train.init_from, cfg.run.root)
        check_classifier_size(cfg, self.data.num_classes, self.data.labelled_classes)
        self.criterion = build_criterion(cfg.loss.terms, self.model.embed_dim, self.data.num_classes,
                                         self.data.labelled_classes)
        self.model.to(self.device)
        self.criterion.to(self.device)
        if self.on_gpu and cfg.train.channels_last:
            self.model.to(memory_format=torch.channels_last)
        trainee = Trainee(self.model, self.criterion, info, cfg.train.loss_fp32)
        self.module: nn.Module = DDP(trainee, device_ids=[self.device] if self.on_gpu else None) if info.distributed else trainee
        if cfg.train.compile:
            self.module = torch.compile(self.module)  # type: ignore[assignment]
        self.optimizer = build_optimizer(param_groups(self.model, self.criterion, cfg.optim), cfg.optim)
        steps, acc = self.data.steps_per_epoch, cfg.optim.accumulate
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda n: lr_factor(cfg.schedule, n * acc / steps, cfg.train.epochs, cfg.optim.lr))
        self.checkpointer = ckpt_lib.Checkpointer(run.ckpt, cfg.train.keep_checkpoints, cfg.train.keep_epoch_checkpoints)
        # fp16 gradients underflow without loss scaling; bf16 and fp32 need none (a disabled scaler is a no-op)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.on_gpu and cfg.train.amp == "fp16")
        self.position = Position()
        self.selection = Selection()

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def autocast(self) -> contextlib.AbstractContextManager[Any]:
        amp = self.cfg.train.amp
        if not self.on_gpu or amp == "off":
            return contextlib.nullcontext()
        dtype = torch.float16 if amp == "fp16" else torch.bfloat16
        return torch.autocast("cuda", dtype=dtype)

    def state(self) -> dict[str, Any]:
        return {
            "model": self.model.state_dict(), "criterion": self.criterion.state_dict(),
            "optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
            "position": vars(self.position).copy(), "rng": ckpt_lib.rng_state(), "scaler": self.scaler.state_dict(),
        }

    def load(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.criterion.load_state_dict(state["criterion"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.position = Position(**state["position"])
        ckpt_lib.set_rng_state(state["rng"])
        if state.get("scaler"):  # empty when saved without fp16 loss scaling
            self.scaler.load_state_dict(state["scaler"])

    def resume(self) -> Path | None:
        """Load the newest readable checkpoint; its path, or None when training starts afresh."""
        found = self.checkpointer.load_latest()
        if found is None:
            return None
        self.load(found[1])
        self.selection = Selection.from_meta(ckpt_lib.read_meta(found[0]))
        return found[0]

    def save(self, epoch_end: bool) -> None:
        if self.info.is_main:
            pos = self.position
            # epoch: 1-based; at an epoch end the epoch just finished, else the one in progress
            meta = {"epoch": pos.epoch if epoch_end else pos.epoch + 1, "epoch_end": epoch_end,
                    "global_step": pos.global_step, "config_digest": self.cfg.digest()}
            if self.cfg.train.validation.every:
                meta["selection"] = self.selection.to_meta()
            self.checkpointer.save(self.state(), pos.global_step, meta)


def batches(training: Training) -> Iterator[tuple[int, int, Any]]:
    """(epoch, step, batch) from the saved position to the end of training."""
    pos = training.position
    for epoch in range(pos.epoch, training.cfg.train.epochs):
        start = pos.step if epoch == pos.epoch else 0
        for step, batch in enumerate(training.data.epoch(epoch, start), start=start):
            yield epoch, step, batch


def train_stage(cfg: ExperimentConfig, run: RunDir, info: DistInfo) -> dict[str, Any]:
    """The stage: train from the newest checkpoint (or from the start) to the end, on every rank."""
    training = Training(cfg, run, info)
    resumed = training.resume()
    if resumed:
        pos = training.position
        print(f"train: resumed from {resumed} at epoch {pos.epoch + 1}, step {pos.step} "
              f"(global step {pos.global_step})", flush=True)
    board = make_board(info, run.tb)
    try:
        with stopping.cooperating():
            last_loss = _loop(training, board)
    finally:
        board.close()
    if training.position.global_step == 0:  # nothing trained and nothing saved: the stage must not be marked done
        raise ValueError(f"train: no training step was run (data.steps_per_epoch {training.data.steps_per_epoch}, "
                         f"train.max_steps {cfg.train.max_steps}), so there is no checkpoint to extract from. Check "
                         f"data.train_splits holds enough samples for one batch of {cfg.data.batch_size}.")
    summary: dict[str, Any] = {"global_step": training.position.global_step, "final_loss": last_loss}
    if cfg.train.validation.every:
        sel = training.selection
        summary.update(best=sel.best, best_epoch=sel.best_epoch, best_step=sel.best_step, stopped_early=sel.stopped)
    return summary


def _loop(training: Training, board: Board) -> float:
    cfg, info, pos = training.cfg, training.info, training.position
    steps = training.data.steps_per_epoch
    meter = _Meter(cfg.data.batch_size)
    loss_value = float("nan")
    if training.selection.stopped:  # resumed after early stopping: nothing left to train
        return loss_value
    training.module.train()
    for epoch, step, (images, labels, index) in batches(training):
        if cfg.train.max_steps and pos.global_step >= cfg.train.max_steps:
            break
        meter.data_ready()
        logging = (pos.global_step + 1) % cfg.train.log_every == 0 or step + 1 == steps
        loss_value, parts = _step(training, images, labels, index, step, logging)
        pos.epoch, pos.step, pos.global_step = epoch, step + 1, pos.global_step + 1
        meter.step_done()
        if pos.global_step % cfg.train.log_every == 0 or step + 1 == steps:
            _log(training, board, meter, loss_value, parts, epoch, step, steps)
        if step + 1 == steps:
            pos.epoch, pos.step = epoch + 1, 0
            _validate(training, board, epoch + 1)  # before the save, whose metadata carries the selection
            training.save(epoch_end=True)
            if training.selection.stopped:
                break
        elif cfg.train.checkpoint_every and pos.global_step % cfg.train.checkpoint_every == 0:
            training.save(epoch_end=False)
        if stopping.agreed(info):
            _stop_here(training)
    if cfg.train.max_steps and pos.step:  # stopped mid-epoch by max_steps: keep that state too
        training.save(epoch_end=False)
    return loss_value


def _validate(training: Training, board: Board, epoch: int) -> None:
    """Validate after ``epoch`` (1-based) when it is due, and update the selection (every rank)."""
    cfg, sel = training.cfg, training.selection
    val = cfg.train.validation
    if not select_lib.due(val, epoch):
        return
    value = select_lib.validate(cfg, training.run, training.info, training.model, epoch)
    improved = sel.record(val, epoch, training.position.global_step, value)
    gs = training.position.global_step
    board.scalar(f"validation/{val.metric}", value, gs)
    if sel.best is not None:
        board.scalar(f"validation/best_{val.metric}", sel.best, gs)
    if training.info.is_main:
        verdict = "a new best" if improved else f"best {sel.best} after epoch {sel.best_epoch}, {sel.bad} without improvement"
        stop = f"; stopping early (patience {val.patience})" if sel.stopped else ""
        print(f"train: validation after epoch {epoch}: {val.metric} {value:.4f} ({verdict}){stop}", flush=True)


def _stop_here(training: Training) -> None:
    """Save where we stand (a safe point: the step is complete) and stop (for a requeue, or for good)."""
    pos = training.position
    if pos.step:  # an epoch end was saved just above
        training.save(epoch_end=False)
    barrier(training.info)
    if training.info.is_main:
        why = "for a requeue" if stopping.purpose() == stopping.REQUEUE else "to end"
        print(f"train: stop requested; saved at global step {pos.global_step} (epoch {pos.epoch + 1}, "
              f"step {pos.step}) {why}", flush=True)
    raise stopping.StopRequested(f"stopped at global step {pos.global_step}")


def _step(training: Training, images: torch.Tensor, labels: torch.Tensor, index: torch.Tensor,
          step: int, logging: bool = True) -> tuple[float, dict[str, float]]:
    cfg, info = training.cfg, training.info
    images = images.to(training.device, non_blocking=True)
    if training.on_gpu and cfg.train.channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    labels = labels.to(training.device, non_blocking=True)
    with training.autocast():
        loss, parts = training.module(images, labels)
    value = float(loss.detach())
    if not math.isfinite(value):
        raise _non_finite(training, value, index)
    acc = cfg.optim.accumulate
    scaler = training.scaler
    scaler.scale(loss * info.world_size / acc).backward()
    if (step + 1) % acc == 0:
        params = [p for g in training.optimizer.param_groups for p in g["params"]]
        if cfg.optim.grad_clip or logging:
            scaler.unscale_(training.optimizer)  # clip and log the true gradients, not the loss-scaled ones
        if cfg.optim.grad_clip:
            training.last_grad_norm = float(torch.nn.utils.clip_grad_norm_(params, cfg.optim.grad_clip))
        elif logging:  # without clipping the norm is only logged: skip it on other steps
            grads = [p.grad for p in params if p.grad is not None]
            training.last_grad_norm = float(torch.nn.utils.get_total_norm(grads))
        scaler.step(training.optimizer)  # skipped (and the scale lowered) when fp16 gradients overflowed
        scaler.update()
        training.optimizer.zero_grad(set_to_none=True)
        training.scheduler.step()
    return value, {k: float(v) for k, v in parts.items()}


def _non_finite(training: Training, value: float, index: torch.Tensor) -> NonFiniteLoss:
    keys = training.data.source.keys[index.numpy()].tolist()
    pos = training.position
    last = training.checkpointer.latest()
    shown = ", ".join(keys[:8]) + (f" ... ({len(keys)} in all)" if len(keys) > 8 else "")
    return NonFiniteLoss(
        f"the loss is {value} at epoch {pos.epoch + 1}, step {pos.step} (global step {pos.global_step}); "
        f"this rank's batch keys: {shown}. Training stopped before the weights were updated. Last good checkpoint: "
        f"{last or 'none yet'}; a resubmission resumes from it. Lower optim.lr, set optim.grad_clip, or check these samples."
    )


class _Meter:
    """Wall-clock of data waiting and of whole steps, for the throughput scalars."""

    def __init__(self, global_batch: int) -> None:
        self.global_batch = global_batch
        self.mark = time.perf_counter()
        self.wait = self.total = 0.0
        self.count = 0

    def data_ready(self) -> None:
        self.wait += time.perf_counter() - self.mark

    def step_done(self) -> None:
        now = time.perf_counter()
        self.total += now - self.mark
        self.mark = now
        self.count += 1

    def read(self) -> dict[str, float]:
        n = max(self.count, 1)
        out = {"images_per_s": self.global_batch * n / max(self.total, 1e-9), "step_time_s": self.total / n,
               "data_wait_s": self.wait / n}
        self.wait = self.total = 0.0
        self.count = 0
        return out


def _log(training: Training, board: Board, meter: _Meter, loss: float, parts: dict[str, float],
         epoch: int, step: int, steps: int) -> None:
    gs = training.position.global_step
    speed = meter.read()
    board.scalar("train/loss", loss, gs)
    if len(parts) > 1:
        board.scalars(parts, gs, prefix="train/loss/")
    for group in training.optimizer.param_groups:
        board.scalar(f"train/lr/{group['name']}", group["lr"], gs)
    board.scalars(speed, gs, prefix="train/")
    board.scalar("train/grad_norm", getattr(training, "last_grad_norm", float("nan")), gs)
    board.scalar("train/epoch", epoch + (step + 1) / steps, gs)
    if training.on_gpu:
        board.scalar("train/gpu_mem_gb", torch.cuda.max_memory_allocated() / 2**30, gs)
    if training.info.is_main:
        lr = training.optimizer.param_groups[0]["lr"]
        print(f"train: epoch {epoch + 1}/{training.cfg.train.epochs} step {step + 1}/{steps} loss {loss:.4f} "
              f"lr {lr:.2e} {speed['images_per_s']:.1f} img/s (data wait {speed['data_wait_s'] * 1000:.0f} ms)", flush=True)
