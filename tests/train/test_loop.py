"""The training loop run directly (world size 1): exact resume, unusable checkpoints passed
over, checkpoint contents, loss, loss scaling, clipping and the sampler."""
import json

import torch
import torch.nn.functional as F
import pytest

from harness.data.ade20k import ADE20K
from harness.models import build_model, load_checkpoint
from harness.optim import build_optimizer
from harness.train.checkpoint import MODEL_FILE, RNG_FILE, STATE_FILE, seed_everything
from harness.train.loop import _loader, _train_transform, epoch_indices, segmentation_loss, train_loop, train_step
from harness.train.session import LocalSession


def _run(cfg, data_root, run_dir, stop_after=None):
    losses = {}
    out = train_loop(cfg, data_root, LocalSession(run_dir), stop_after=stop_after,
                     progress=lambda r: losses.__setitem__(r["iteration"], r["loss"]))
    return out, losses


def test_resume_mid_epoch_continues_with_identical_losses(tiny_cfg, data_root, tmp_path):
    # 4 iterations per epoch: stopping at 3 resumes mid-epoch, the run crosses two boundaries;
    # dropout and drop-path draw from the restored RNG.
    cfg = tiny_cfg(optim={"iterations": 9, "checkpoint_interval": 1000})
    _, full = _run(cfg, data_root, tmp_path / "full")
    first, part1 = _run(cfg, data_root, tmp_path / "split", stop_after=3)
    assert first["iterations"] == 3
    second, part2 = _run(cfg, data_root, tmp_path / "split")
    assert second["start_iteration"] == 3 and second["iterations"] == 9
    assert sorted(full) == list(range(1, 10))
    assert sorted(part1) == [1, 2, 3] and sorted(part2) == list(range(4, 10))
    resumed = {**part1, **part2}
    for t in full:
        assert resumed[t] == pytest.approx(full[t], abs=1e-6), f"iteration {t}"
    a = load_checkpoint(tmp_path / "full" / "checkpoints" / "iter_0000009")[0].state_dict()
    b = load_checkpoint(tmp_path / "split" / "checkpoints" / "iter_0000009")[0].state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6, msg=k)


def test_checkpoint_holds_training_state_readable_with_weights_only(tiny_cfg, data_root, tmp_path):
    cfg = tiny_cfg(optim={"iterations": 9})
    _run(cfg, data_root, tmp_path, stop_after=6)
    ckpt_dir = tmp_path / "checkpoints" / "iter_0000006"
    ckpt = torch.load(ckpt_dir / MODEL_FILE, weights_only=True)
    assert ckpt["iteration"] == 6
    assert ckpt["loader"] == {"epoch": 1, "position": 2, "iters_per_epoch": 4}
    assert ckpt["scheduler"]["last_epoch"] == 6
    assert ckpt["optimizer"]["state"], "momentum buffers are saved"
    assert ckpt["config"] == cfg.to_dict()
    assert ckpt["scaler"] == {}, "fp32: the disabled scaler's (empty) state"
    state = json.loads((ckpt_dir / STATE_FILE).read_text())
    assert state == {"iteration": 6, "world_size": 1, "config": cfg.to_dict()}
    rng = torch.load(ckpt_dir / RNG_FILE.format(rank=0), weights_only=True)
    assert set(rng) == {"torch", "cuda", "numpy", "python"}
    model, loaded_cfg = load_checkpoint(ckpt_dir)
    assert loaded_cfg == cfg and model.n_cls == cfg.model.n_cls


def test_resume_passes_over_unusable_checkpoints_naming_the_bad_file(tiny_cfg, data_root, tmp_path, capsys):
    cfg = tiny_cfg(optim={"iterations": 4, "checkpoint_interval": 1})
    _run(cfg, data_root, tmp_path, stop_after=3)
    ckpts = tmp_path / "checkpoints"
    rng = ckpts / "iter_0000003" / RNG_FILE.format(rank=0)
    rng.unlink()
    model = ckpts / "iter_0000002" / MODEL_FILE
    model.write_bytes(model.read_bytes()[:1000])
    capsys.readouterr()
    out, losses = _run(cfg, data_root, tmp_path)
    assert out["start_iteration"] == 1 and sorted(losses) == [2, 3, 4]
    skipped = [line for line in capsys.readouterr().err.splitlines() if "skipped an unusable checkpoint" in line]
    assert len(skipped) == 2
    assert skipped[0].endswith(f"{rng}: missing") and f"{model}: unreadable (" in skipped[1]


def test_resume_refuses_a_different_config(tiny_cfg, data_root, tmp_path):
    from harness.config import InputError

    _run(tiny_cfg(optim={"iterations": 4}), data_root, tmp_path, stop_after=1)
    with pytest.raises(InputError, match="optim"):
        _run(tiny_cfg(optim={"iterations": 4, "lr": 0.5}), data_root, tmp_path)


def test_gradient_clipping_bounds_the_first_update(tiny_cfg, data_root, tmp_path):
    clip, lr = 1e-6, 0.01
    cfg = tiny_cfg(recipe="paddlevit", optim={"iterations": 2, "lr": lr, "clip_grad": clip, "decoder_lr_mult": 1.0})
    seed_everything(cfg.optim.seed)
    before = build_model(cfg.model).state_dict()
    _run(cfg, data_root, tmp_path, stop_after=1)
    after = load_checkpoint(tmp_path / "checkpoints" / "iter_0000001")[0].state_dict()
    step = torch.sqrt(sum(((after[k] - before[k]).double() ** 2).sum() for k in before))
    # plain momentum, first step: update = lr * clipped gradient, whose global norm is <= clip
    assert 0 < step <= lr * clip * 1.001


def test_loss_scaling_changes_the_update_by_nothing(tiny_cfg, data_root):
    # fp16's scaler, run on fp32 CPU gradients: scaling by a power of two is exact, so the enabled
    # scaler must give the disabled one's update, clipping included (it unscales before clipping).
    cfg = tiny_cfg(optim={"iterations": 2, "clip_grad": 1e-3})
    train_set = ADE20K(data_root, "training", _train_transform(cfg), seed=cfg.optim.seed)
    batch = next(iter(_loader(train_set, cfg, 0, 0, cfg.optim.batch_size, 4, 0, 1)))
    runs = []
    for enabled in (False, True):
        seed_everything(0)
        model = build_model(cfg.model)
        optimizer, scheduler = build_optimizer(model, cfg)
        scaler = torch.amp.GradScaler("cpu", enabled=enabled)
        seed_everything(1)
        loss = train_step(model, model, batch, optimizer, scheduler, scaler, None, cfg, torch.device("cpu"))
        runs.append((loss, model.state_dict(), scaler.state_dict()))
    (loss, plain, off), (scaled_loss, scaled, on) = runs
    assert scaled_loss == loss and off == {}
    assert on["scale"] == 2.0**16 and on["_growth_tracker"] == 1, on
    for k in plain:
        torch.testing.assert_close(scaled[k], plain[k], rtol=0, atol=1e-7, msg=k)


def test_loss_averages_over_labelled_or_all_pixels():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 4, 4)
    label = torch.randint(0, 5, (2, 4, 4))
    label[0, :2] = 255
    per_pixel = F.cross_entropy(logits, label, ignore_index=255, reduction="none")
    assert segmentation_loss(logits, label, "labelled") == pytest.approx(
        F.cross_entropy(logits, label, ignore_index=255).item(), rel=1e-6)
    assert segmentation_loss(logits, label, "all") == pytest.approx(per_pixel.sum().item() / label.numel(), rel=1e-6)
    assert segmentation_loss(logits, torch.full_like(label, 255), "labelled").item() == 0.0


def test_epoch_order_is_a_function_of_seed_and_epoch():
    a = [epoch_indices(10, seed=3, epoch=e, rank=0, world_size=1) for e in range(2)]
    assert a == [epoch_indices(10, 3, e, 0, 1) for e in range(2)]
    assert a[0] != a[1] and sorted(a[0]) == list(range(10))
    assert epoch_indices(10, 4, 0, 0, 1) != a[0]
    shards = [epoch_indices(10, 3, 1, r, 3) for r in range(3)]
    # the epoch's permutation dealt round-robin, the remainder (10 % 3) left out
    assert shards == [a[1][r:9:3] for r in range(3)]
