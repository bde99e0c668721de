"""Optimiser and schedule of each recipe against shared/reference/segmenter.md §3, and the
polynomial decay against the three implementations' own update rules."""
import math

import pytest
import torch

from harness.config import load_config
from harness.models import build_model
from harness.optim import build_optimizer, poly_horizon, poly_lr

# shared/reference/segmenter.md §3, one column per recipe: what the table says, written out
# independently of experiments/recipes/*.yaml so a wrong YAML or schedule fails here.
SECTION_3 = {
    "reference": dict(lr=1e-3, min_lr=1e-5, iterations=161_728, batch=8, momentum=0.9, nesterov=True,
                      weight_decay=0.0, decoder_mult=1.0, clip=None, loss="labelled"),
    "mmseg": dict(lr=1e-3, min_lr=1e-4, iterations=160_000, batch=8, momentum=0.9, nesterov=False,
                  weight_decay=0.0, decoder_mult=1.0, clip=None, loss="all"),
    "paddlevit": dict(lr=1e-3, min_lr=1e-4, iterations=160_000, batch=16, momentum=0.9, nesterov=False,
                      weight_decay=0.0, decoder_mult=10.0, clip=1.0, loss=None),
}
POWER = 0.9
# the tests step schedulers without optimiser steps on purpose
pytestmark = pytest.mark.filterwarnings("ignore:Detected call of `lr_scheduler.step\\(\\)`")


def _lrs_at(scheduler, optimizer, t):
    """Group learning rates of iteration t, as the loop sees them after t scheduler steps."""
    scheduler.last_epoch = t - 1
    scheduler.step()
    return [g["lr"] for g in optimizer.param_groups]


@pytest.fixture(scope="module")
def model():
    with torch.device("meta"):  # parameters only; nothing is computed
        return build_model(load_config("seg_tiny_mask").model)


@pytest.mark.parametrize("recipe", sorted(SECTION_3))
def test_recipe_optimiser_and_schedule_match_section_3(recipe, model):
    facts = SECTION_3[recipe]
    cfg = load_config("seg_tiny_mask", recipe=recipe)
    o = cfg.optim
    assert (o.iterations, o.batch_size, o.clip_grad) == (facts["iterations"], facts["batch"], facts["clip"])
    if facts["loss"]:
        assert o.loss_average == facts["loss"]
    optimizer, scheduler = build_optimizer(model, cfg)
    assert isinstance(optimizer, torch.optim.SGD)
    enc, dec = optimizer.param_groups
    for g in (enc, dec):
        assert g["momentum"] == facts["momentum"]
        assert g["nesterov"] is facts["nesterov"]
        assert g["weight_decay"] == facts["weight_decay"]
    assert {id(p) for p in dec["params"]} == {id(p) for p in model.decoder.parameters()}
    T, lr, lo, mult = facts["iterations"], facts["lr"], facts["min_lr"], facts["decoder_mult"]

    # t = 0: the base rate, no warmup
    assert _lrs_at(scheduler, optimizer, 0) == pytest.approx([lr, mult * lr], rel=1e-12)
    # t = T/2: halfway along the poly curve (MMSeg's horizon is T - 1, see harness/optim.py)
    N = T - 1 if recipe == "mmseg" else T
    mid = (lr - lo) * (1 - (T // 2) / N) ** POWER + lo
    assert _lrs_at(scheduler, optimizer, T // 2) == pytest.approx([mid, mult * mid], rel=1e-12)
    # t = T: the minimum (PaddleViT scales the whole schedule, end_lr included, by the coefficient)
    assert _lrs_at(scheduler, optimizer, T) == pytest.approx([lo, mult * lo], rel=1e-12)
    # the last iteration: only MMSeg's schedule is already at its minimum there
    last = _lrs_at(scheduler, optimizer, T - 1)[0]
    assert (last == pytest.approx(lo, rel=1e-12)) is (recipe == "mmseg")


def test_poly_matches_each_implementations_update_rule():
    T, lr, lo = 50, 1e-2, 1e-4
    # rstrudel/segmenter PolynomialLR (iter_warmup=0): closed form in the number of updates done
    ref = [(lr - lo) * (1 - t / T) ** POWER + lo for t in range(T)]
    # paddle PolynomialDecay(cycle=False): epoch = min(epoch, decay_steps)
    pvt = [(lr - lo) * (1 - min(t, T) / T) ** POWER + lo for t in range(T + 5)]
    # mmengine PolyLR(begin=0, end=T): chainable, total_iters = end - begin - 1, no update after end
    mms, cur, total = [lr], lr, T - 1
    for step in range(1, T):
        cur = (cur - lo) * (1 - 1 / (total - step + 1)) ** POWER + lo
        mms.append(cur)
    assert [poly_lr(t, lr, lo, POWER, T) for t in range(T)] == pytest.approx(ref, rel=1e-12)
    assert [poly_lr(t, lr, lo, POWER, T) for t in range(T + 5)] == pytest.approx(pvt, rel=1e-12)
    assert [poly_lr(t, lr, lo, POWER, T - 1) for t in range(T)] == pytest.approx(mms, rel=1e-9)
    for recipe, horizon in (("reference", T), ("paddlevit", T), ("mmseg", T - 1)):
        cfg = load_config("seg_tiny_mask", recipe=recipe, overrides={"optim": {"iterations": T}})
        assert poly_horizon(cfg) == horizon


def test_reference_warmup_and_step_size():
    """rstrudel/segmenter ``PolynomialLR.get_lr`` at ``last_epoch`` t, written out: the rate
    changes only when t is a positive multiple of the step size and t <= iter_max."""
    T, lr, lo, warmup, step = 40, 1e-2, 1e-4, 8, 3

    def reference(t: int, current: float) -> float:
        if t == 0 or t % step or t > T:
            return current
        coef = t / warmup * (1 - warmup / T) ** POWER if t < warmup else (1 - t / T) ** POWER
        return (lr - lo) * coef + lo

    want, cur = [], lr
    for t in range(T + 6):
        cur = reference(t, cur)
        want.append(cur)
    assert [poly_lr(t, lr, lo, POWER, T, warmup, step) for t in range(T + 6)] == pytest.approx(want, rel=1e-12)


def test_scheduler_steps_once_per_iteration_and_never_below_min(model, tiny_cfg):
    cfg = tiny_cfg(optim={"iterations": 20, "lr": 0.5, "min_lr": 0.1})
    optimizer, scheduler = build_optimizer(model, cfg)
    seen = []
    for _ in range(25):
        seen.append(optimizer.param_groups[0]["lr"])
        scheduler.step()
    assert seen[0] == 0.5
    assert all(a > b for a, b in zip(seen[:20], seen[1:21]))
    assert seen[20:] == pytest.approx([0.1] * 5)
    assert math.isclose(seen[10], 0.4 * 0.5 ** POWER + 0.1)
