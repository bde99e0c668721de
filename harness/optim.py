"""Optimiser and learning-rate schedule of each recipe (shared/reference/segmenter.md §3).

All three recipes decay the learning rate polynomially, stepped once per iteration after the
update, with no warmup (the reference's optional warmup and step size: ``poly_lr``). Iteration t (0-based; t updates done before it) uses

    lr_t = (lr - min_lr) * (1 - min(t, N) / N) ** power + min_lr

and the recipes differ only in the horizon N:

- reference (rstrudel/segmenter segm/optim/scheduler.py ``PolynomialLR`` with
  ``iter_warmup=0``, ``step_size=1``, stepped by ``step_update`` after every update in
  segm/engine.py): ``(lr - min_lr) * (1 - iter_cur / iter_max) ** power + min_lr`` with
  ``iter_cur`` = updates done, N = iter_max = T.
- PaddleViT (``paddle.optimizer.lr.PolynomialDecay(base_lr, decay_steps=ITERS, end_lr,
  power, cycle=False)``, stepped after ``optimizer.step()`` in semantic_segmentation/train.py):
  the same closed form with ``epoch = min(epoch, decay_steps)``, N = T.
- MMSegmentation (mmengine ``PolyLR(eta_min, power, begin=0, end=T, by_epoch=False)``):
  ``total_iters = end - begin - 1``; the chainable update
  ``(lr_{t-1} - eta_min) * (1 - 1 / (total_iters - t + 1)) ** power + eta_min`` telescopes
  to the closed form with N = T - 1, so the last iteration runs at exactly eta_min.

PaddleViT's decoder learning-rate coefficient (``param.optimize_attr['learning_rate'] =
DECODER_LR_COEF``) multiplies the scheduled rate itself, end_lr included, so the decoder group
runs at ``decoder_lr_mult * lr_t``; its gradient clipping is ``ClipGradByGlobalNorm`` (one
norm over every parameter), applied in the training loop.
"""
from __future__ import annotations

import torch
from torch.optim.lr_scheduler import LRScheduler

from harness.config import Config

# Recipes whose polynomial horizon is T - 1 (mmengine's total_iters = end - begin - 1).
_HORIZON_MINUS_ONE = frozenset({"mmseg"})


def poly_horizon(cfg: Config) -> int:
    """N in the closed form above for this config's recipe."""
    T = cfg.optim.iterations
    return max(T - 1, 1) if cfg.recipe in _HORIZON_MINUS_ONE else T


def poly_lr(t: int, lr: float, min_lr: float, power: float, horizon: int, warmup: int = 0, step: int = 1) -> float:
    """Learning rate of iteration ``t`` (0-based) before any group multiplier.

    ``warmup`` and ``step`` follow the reference's ``PolynomialLR`` (``iter_warmup``,
    ``poly_step_size``; both 0 and 1 in every released run): the rate changes only on
    multiples of ``step`` and not after the horizon, iteration 0 runs at the base rate, and
    during warmup the coefficient is ``t / warmup * (1 - warmup / horizon) ** power``.
    """
    t = min(t, horizon)
    t -= t % step
    if t == 0:
        return lr
    if t < warmup:
        coef = t / warmup * (1.0 - warmup / horizon) ** power
    else:
        coef = (1.0 - t / horizon) ** power
    return (lr - min_lr) * coef + min_lr


class PolyLR(LRScheduler):
    """Closed-form polynomial decay: group i runs at ``mults[i] * poly_lr(t)``.

    Computed from t rather than chained from the previous rate, so a resumed run gets the
    same rates bit for bit; its state dict holds only numbers and lists (loadable with
    ``torch.load(weights_only=True)``).
    """

    def __init__(self, optimizer: torch.optim.Optimizer, lr: float, min_lr: float, power: float,
                 horizon: int, mults: list[float], warmup: int = 0, step: int = 1, last_epoch: int = -1):
        if len(mults) != len(optimizer.param_groups):
            raise ValueError(f"{len(mults)} multipliers for {len(optimizer.param_groups)} parameter groups")
        self.lr, self.min_lr, self.power, self.horizon = lr, min_lr, power, horizon
        self.warmup, self.step_size = warmup, step
        self.mults = list(mults)
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        base = poly_lr(self.last_epoch, self.lr, self.min_lr, self.power, self.horizon, self.warmup, self.step_size)
        return [m * base for m in self.mults]


def param_groups(model: torch.nn.Module, cfg: Config) -> tuple[list[dict], list[float]]:
    """Encoder and decoder parameter groups and their learning-rate multipliers.

    The encoder's ImageNet classification heads never see a gradient (the reference keeps them
    only for checkpoint compatibility), so they are frozen and left out: SGD would skip them
    anyway, and DDP then needs no unused-parameter search.
    """
    enc = model.encoder
    for head in (getattr(enc, "head", None), getattr(enc, "head_dist", None)):
        if head is not None:
            head.requires_grad_(False)
    encoder = [p for p in enc.parameters() if p.requires_grad]
    decoder = [p for p in model.decoder.parameters() if p.requires_grad]
    mult = cfg.optim.decoder_lr_mult
    groups = [{"params": encoder, "name": "encoder", "lr": cfg.optim.lr},
              {"params": decoder, "name": "decoder", "lr": cfg.optim.lr * mult}]
    return groups, [1.0, mult]


def build_optimizer(model: torch.nn.Module, cfg: Config) -> tuple[torch.optim.SGD, PolyLR]:
    """SGD (momentum, Nesterov and weight decay from the config; weight decay is 0 in every
    recipe, applied uniformly otherwise) with the recipe's polynomial schedule."""
    o = cfg.optim
    groups, mults = param_groups(model, cfg)
    optimizer = torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                                weight_decay=o.weight_decay)
    scheduler = PolyLR(optimizer, o.lr, o.min_lr, o.poly_power, poly_horizon(cfg), mults, o.warmup_iterations,
                       o.poly_step_size)
    return optimizer, scheduler
