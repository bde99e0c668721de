"""The iteration loop every training worker runs (shared/reference/segmenter.md §3): model,
sharded loader, forward/backward/update, periodic validation and checkpoints, reported through
a ``Session``."""
from __future__ import annotations

import math
import os
import socket
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn.functional as F

from harness import weights
from harness.config import Config, InputError
from harness.data.ade20k import ADE20K, IGNORE_INDEX, DataError
from harness.data.transforms import build_train_transform, loader_generator, seed_worker
from harness.evaluate import Protocol, all_reduce_confusion, evaluate_dataset, model_predictor
from harness.models import build_model, load_backbone_weights
from harness.optim import build_optimizer
from harness.tracking import MetricsLogger
from harness.train.checkpoint import TrainState, restore, save, seed_everything
from harness.train.session import RaySession, Session

Progress = Callable[[dict], None]


def segmentation_loss(logits: torch.Tensor, label: torch.Tensor, average: str) -> torch.Tensor:
    """Cross-entropy with ignore 255, averaged over labelled pixels (reference
    ``CrossEntropyLoss(ignore_index=255)``) or over all pixels (MMSeg ``avg_non_ignore=False``:
    ignored pixels count in the denominator with loss 0)."""
    total = F.cross_entropy(logits.float(), label, ignore_index=IGNORE_INDEX, reduction="sum")
    count = (label != IGNORE_INDEX).sum() if average == "labelled" else torch.tensor(label.numel())
    # a crop with no labelled pixel contributes 0 instead of NaN
    return total / count.clamp(min=1).to(total.device)


def _train_transform(cfg: Config):
    d = cfg.data
    if d.augmentation == "paddlevit":
        kwargs = {"scale_range": d.ratio_range}
    else:
        kwargs = {"scale": d.train_scale, "ratio_range": d.ratio_range, "cat_max_ratio": d.cat_max_ratio}
    return build_train_transform(d.augmentation, d.crop_size, cfg.mean, cfg.std, **kwargs)


def epoch_indices(n: int, seed: int, epoch: int, rank: int, world_size: int) -> list[int]:
    """This rank's items of one epoch: a permutation of the whole split drawn from
    (seed, epoch) only, dealt round-robin to the ranks (DistributedSampler without padding)."""
    order = torch.randperm(n, generator=loader_generator(seed, epoch)).tolist()
    usable = n - n % world_size
    return order[rank:usable:world_size]


def _loader(dataset: ADE20K, cfg: Config, epoch: int, position: int, per_rank: int, iters_per_epoch: int,
            rank: int, world_size: int) -> torch.utils.data.DataLoader:
    """Batches ``position..iters_per_epoch-1`` of ``epoch`` (resuming skips consumed batches)."""
    idx = epoch_indices(len(dataset), cfg.optim.seed, epoch, rank, world_size)
    idx = idx[position * per_rank:iters_per_epoch * per_rank]
    workers = cfg.data.num_workers
    # the generator keeps the loader off the global torch RNG (its worker seeds come from it)
    return torch.utils.data.DataLoader(
        dataset, batch_size=per_rank, sampler=[(epoch, i) for i in idx], num_workers=workers,
        worker_init_fn=seed_worker, generator=loader_generator(cfg.optim.seed, epoch, rank),
        pin_memory=torch.cuda.is_available(), drop_last=True, persistent_workers=False)


def _agree_on_error(error: str | None, device: torch.device) -> None:
    """Every rank learns whether any rank hit a bad dataset file, and all raise the same
    ``DataError`` together: a rank that raised alone would leave the others waiting in the next
    collective, and Ray Train would retry a failure that repeats identically."""
    if dist.is_available() and dist.is_initialized():
        flag = torch.tensor([error is not None], dtype=torch.int32, device=device)
        dist.all_reduce(flag)
        if flag.item():
            messages = [None] * dist.get_world_size()
            dist.all_gather_object(messages, error)
            error = next(m for m in messages if m is not None)
    if error is not None:
        raise DataError(error)


def _batches(loader: torch.utils.data.DataLoader, device: torch.device) -> Iterator[dict]:
    """The loader's batches, the ranks agreeing after every fetch that none failed (one tiny
    all-reduce per iteration, negligible beside a step)."""
    it = iter(loader)
    while True:
        error = None
        try:
            batch = next(it)
        except StopIteration:  # every rank holds the same number of batches
            return
        except DataError as e:
            error = str(e)
        _agree_on_error(error, device)
        yield batch


def precision(cfg: Config, device: torch.device) -> tuple[torch.dtype | None, torch.amp.GradScaler]:
    """Autocast dtype (None: fp32) and gradient scaler of ``cfg.optim.amp``; CPUs train in fp32.
    Only fp16 scales the loss: for any other precision the scaler is disabled, a pass-through."""
    amp = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.optim.amp) if device.type == "cuda" else None
    return amp, torch.amp.GradScaler(device.type, enabled=amp is torch.float16)


@dataclass
class Training:
    """What one worker trains with: the model on its device, optimiser, schedule, autocast dtype
    (None: fp32) and gradient scaler."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    amp: torch.dtype | None
    scaler: torch.amp.GradScaler


def build_training(cfg: Config, device: torch.device) -> Training:
    """The model (seeded with ``cfg.optim.seed``: the same initial weights on every rank),
    optimiser, schedule and precision of ``cfg`` on ``device``; the training loop and the
    training benchmark both build their step with it."""
    seed_everything(cfg.optim.seed)
    model = build_model(cfg.model)
    model.to(device)
    optimizer, scheduler = build_optimizer(model, cfg)
    amp, scaler = precision(cfg, device)
    return Training(model, optimizer, scheduler, amp, scaler)


def train_step(net: torch.nn.Module, model: torch.nn.Module, batch: dict, optimizer, scheduler,
               scaler: torch.amp.GradScaler, amp: torch.dtype | None, cfg: Config, device: torch.device) -> float:
    """One iteration: forward, loss, backward, (clip,) update, schedule; returns the loss.
    ``net`` is ``model`` or its DDP wrapper."""
    o = cfg.optim
    image = batch["image"].to(device, non_blocking=True)
    label = batch["label"].to(device, non_blocking=True)
    with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
        logits = net(image)
    loss = segmentation_loss(logits, label, o.loss_average)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if o.clip_grad:
        scaler.unscale_(optimizer)  # the threshold applies to the true gradients
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.clip_grad)
    scaler.step(optimizer)  # skipped when an fp16 gradient overflowed
    scaler.update()
    scheduler.step()
    return loss.item()


def _all_mean(values: list[float], device: torch.device) -> list[float]:
    t = torch.tensor(values, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t.tolist()


def _format_eta(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"


def format_progress(record: dict) -> str:
    line = (f"iter {record['iteration']}/{record['total']}  loss {record['loss']:.4f}  "
            f"lr {record['lr']:.3e}  eta {_format_eta(record['eta_s'])}")
    if "val/mIoU" in record:
        line += f"  val mIoU {record['val/mIoU']:.2f}  mAcc {record['val/mAcc']:.2f}  aAcc {record['val/aAcc']:.2f}"
    return line




def _load_backbone(model, cfg: Config, path: Path) -> None:
    """The ImageNet encoder weights, checked to be the very file the driver resolved (a node
    may hold another file at the same path)."""
    if not path.is_file():
        raise InputError(f"{path}: backbone weights not found on {socket.gethostname()}; put the Hugging Face "
                         f"cache (or --backbone-dir) on storage every node sees")
    digest = weights.sha256_file(path)
    if cfg.model.init_sha256 and digest != cfg.model.init_sha256:
        raise InputError(f"{path} on {socket.gethostname()}: SHA-256 {digest} is not the {cfg.model.init_sha256} "
                         f"the run was resolved with")
    load_backbone_weights(model, path, cfg.model.backbone)


def _validate(model, cfg: Config, val_set: ADE20K, device: torch.device) -> dict:
    model.eval()
    predict = model_predictor(model, cfg, Protocol.during_training(cfg), device)
    cm, error = None, None
    try:
        cm = evaluate_dataset(predict, val_set, cfg.model.n_cls, progress=False)
    except DataError as e:
        error = str(e)
    _agree_on_error(error, device)
    cm = all_reduce_confusion(cm)
    model.train()
    out = cm.compute(cfg.eval.bookkeeping)
    return {"val/mIoU": out["mIoU"], "val/mAcc": out["mAcc"], "val/aAcc": out["aAcc"]}


# ---------------------------------------------------------------- the loop

def train_loop(cfg: Config, data_root: str | os.PathLike, session: Session, *,
               backbone_weights: str | os.PathLike | None = None, tracking: dict | None = None,
               progress: Progress | None = None, stop_after: int | None = None) -> dict:
    """Train ``cfg`` from the session's latest checkpoint (or from the start) to
    ``cfg.optim.iterations``, or only to ``stop_after`` (checkpointed there, as if stopped).

    Returns ``{"iterations", "start_iteration", "metrics", "val"}`` (rank 0's view).
    ``progress`` (rank 0) and ``session.report`` (every rank) get a record every log,
    checkpoint and eval interval; the session's hooks run after every iteration.
    """
    o = cfg.optim
    rank, world, device = session.rank, session.world_size, session.device
    if o.batch_size % world:
        raise InputError(f"optim.batch_size {o.batch_size} is not divisible by {world} workers")
    per_rank = o.batch_size // world
    train_set = ADE20K(data_root, "training", _train_transform(cfg), seed=o.seed)
    val_set = ADE20K(data_root, "validation").shard(rank, world)
    iters_per_epoch = len(train_set) // world // per_rank
    if iters_per_epoch == 0:
        raise InputError(f"{data_root}: {len(train_set)} training images are fewer than one global batch "
                         f"({o.batch_size})")

    if cfg.model.init == "pretrained" and not backbone_weights:
        raise InputError(weights.missing_message(cfg))
    # The same seed on every rank: identical initial weights (DDP broadcasts rank 0's anyway).
    built = build_training(cfg, device)
    model, optimizer, scheduler, amp, scaler = built.model, built.optimizer, built.scheduler, built.amp, built.scaler
    seed_everything(o.seed + rank)  # dropout / drop-path differ across ranks
    with session.latest_checkpoint() as ckpt_dir:
        state = restore(ckpt_dir, rank, model, cfg, optimizer, scheduler, scaler) if ckpt_dir else TrainState()
    if ckpt_dir is None and backbone_weights and rank == 0:
        # rank 0 alone needs the file: DDP broadcasts its parameters to the other ranks
        _load_backbone(model, cfg, Path(backbone_weights))
    start = state.iteration
    net = model
    if world > 1:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)

    end = o.iterations if stop_after is None else min(stop_after, o.iterations)
    mlflow = MetricsLogger(tracking if rank == 0 else None)
    window_loss, window_n = 0.0, 0
    # ETA from the time of training iterations, data loading included, evaluation excluded
    train_time, tick = 0.0, time.perf_counter()
    metrics: dict = {}
    model.train()
    while state.iteration < end:
        loader = _loader(train_set, cfg, state.epoch, state.position, per_rank, iters_per_epoch, rank, world)
        for batch in _batches(loader, device):
            lr = optimizer.param_groups[0]["lr"]
            loss_value = train_step(net, model, batch, optimizer, scheduler, scaler, amp, cfg, device)
            if not math.isfinite(loss_value):
                raise FloatingPointError(f"{cfg.name}: loss is {loss_value} at iteration {state.iteration + 1}")
            state.iteration += 1
            state.position += 1
            if state.position == iters_per_epoch:
                state.epoch, state.position = state.epoch + 1, 0
            now = time.perf_counter()
            train_time, tick = train_time + now - tick, now
            window_loss, window_n = window_loss + loss_value, window_n + 1

            t = state.iteration
            do_eval = t % o.eval_interval == 0 or t == o.iterations
            do_ckpt = t % o.checkpoint_interval == 0 or t == end
            if not (do_eval or do_ckpt or t % o.log_interval == 0):
                session.on_iteration(t, start, loss_value, False)
                continue
            (mean_loss,) = _all_mean([window_loss / window_n], device)
            window_loss, window_n = 0.0, 0
            done = t - start
            metrics = {"iteration": t, "total": o.iterations, "epoch": state.epoch, "loss": mean_loss, "lr": lr,
                       "eta_s": train_time / done * (o.iterations - t), "elapsed_s": train_time}
            if device.type == "cuda":  # the CUDA allocator peak of this rank so far (for gpu-check)
                metrics["peak_memory_mb"] = torch.cuda.max_memory_allocated(device) / 2**20
            if do_eval:
                state.val = _validate(model, cfg, val_set, device)
                metrics.update(state.val)
            if rank == 0:
                mlflow.log({"train/loss": mean_loss, "train/lr": lr, **(state.val if do_eval else {})}, step=t)
                if progress is not None:
                    progress(dict(metrics))
            if do_ckpt:
                with tempfile.TemporaryDirectory(prefix="segrepro-ckpt-") as tmp:
                    save(Path(tmp), rank, world, model, cfg, optimizer, scheduler, scaler, state, iters_per_epoch)
                    session.report(metrics, Path(tmp))
            else:
                session.report(metrics, None)
            tick = time.perf_counter()
            session.on_iteration(t, start, loss_value, do_ckpt)
            if t == end:
                break
    return {"iterations": state.iteration, "start_iteration": start, "metrics": metrics, "val": state.val}


# the one record rank 0 sends before any progress: the id of its worker group's placement group
PLACEMENT_GROUP = "placement_group"


def ray_worker(config: dict) -> dict:
    import ray.util

    queue = config["queue"]
    session = RaySession(config["resume_from"], config["hooks"])
    progress = queue.put if session.rank == 0 else None
    group = ray.util.get_current_placement_group()
    if progress and group:  # so the driver can release the group should Ray Train leave it behind
        progress({PLACEMENT_GROUP: group.id.hex()})
    try:
        return train_loop(config["cfg"], config["data_root"], session, backbone_weights=config["backbone_weights"],
                          tracking=config["tracking"], progress=progress)
    except DataError as e:  # every rank gets here together; returning keeps Ray Train from retrying
        return {"data_error": str(e)}
