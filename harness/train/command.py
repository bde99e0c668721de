"""``segrepro train``: its arguments and what it prints."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from harness import interrupt, weights
from harness.config import InputError, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="zoo configuration name or YAML path")
    parser.add_argument("--data-root", required=True, help="directory holding ADEChallengeData2016 (or that directory)")
    parser.add_argument("--profile", help="run profile (smoke, full); default: the config's")
    parser.add_argument("--recipe", help="named recipe (reference, mmseg, paddlevit)")
    parser.add_argument("--workers", type=int, default=1, help="Ray Train workers (DDP ranks); must divide the global batch")
    parser.add_argument("--gpus-per-worker", type=float, default=0, help="GPUs per worker (0: CPU workers on gloo)")
    parser.add_argument("--address", help="Ray cluster address (default: start a local Ray)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --run-dir from its newest usable checkpoint")
    parser.add_argument("--run-dir", help="run directory (default runs/train/CONFIG-RECIPE-PROFILE)")
    add_init_arguments(parser)
    parser.add_argument("--backbone-weights", help="an explicit ImageNet checkpoint file of the config's backbone "
                                                   "(default: the Hugging Face cache, then --backbone-dir)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (metrics train/loss, train/lr, val/mIoU)")
    parser.add_argument("--json", action="store_true", help="print the result as JSON")


def add_init_arguments(parser: argparse.ArgumentParser) -> None:
    """Where the encoder starts and the training precision: shared by train and reproduce."""
    parser.add_argument("--backbone-dir", help="directory of ImageNet checkpoints named by timm tag or model name "
                                               "(TAG.safetensors, BACKBONE.pth, ...), searched after the Hugging Face cache")
    parser.add_argument("--from-scratch", action="store_true",
                        help="train the encoder from random init instead of the ImageNet checkpoint (recorded with the run)")
    parser.add_argument("--amp", choices=["fp32", "fp16", "bf16"],
                        help="training precision (default: the recipe's, fp32 for every source; mixed precision on CUDA only)")


def precision_overrides(args: argparse.Namespace) -> dict | None:
    return {"optim": {"amp": args.amp}} if getattr(args, "amp", None) else None


def run(args: argparse.Namespace) -> int:
    cfg = load_config(args.config, recipe=args.recipe, profile=args.profile, overrides=precision_overrides(args))
    run_dir = args.run_dir or Path("runs") / "train" / f"{cfg.name}-{cfg.recipe}-{cfg.profile}"
    requested = cfg.model.init
    cfg, found = weights.resolve(cfg, args.backbone_dir, args.backbone_weights, args.from_scratch)
    if not args.json:
        print(f"{cfg.name} ({cfg.recipe} recipe, {cfg.profile} profile): {cfg.optim.iterations} iterations at "
              f"global batch {cfg.optim.batch_size} in {cfg.optim.amp} on {args.workers} worker(s); "
              f"run directory {run_dir}\n  encoder init: {weights.describe(cfg, found, requested)}", file=sys.stderr)
    from harness.data.ade20k import DataError
    from harness.train.driver import train

    args.run_dir = run_dir  # the error boundary writes its log there (harness/errors.py)
    rerun = " ".join(sys.argv[1:]) if "--resume" in sys.argv else " ".join([*sys.argv[1:], "--resume"])
    with interrupt.handling_sigint():
        try:
            out = train(cfg, args.data_root, run_dir, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                        address=args.address, resume=args.resume, backbone_weights=found.path if found else None,
                        tracking_uri=args.tracking_uri)
        except DataError as e:
            raise DataError(f"{e}; then rerun `segrepro {rerun}` to continue from the last checkpoint") from e
        except Exception as e:
            if isinstance(e, InputError) or not (interrupt.requested() or interrupt.wait(2)):
                raise
            raise interrupt.Interrupted(f"interrupted; rerun `segrepro {rerun}` to continue from the last "
                                        f"checkpoint") from None
    if args.json:
        print(json.dumps(out, indent=2))
    elif out.get("already_finished"):
        print(f"{cfg.name}: already finished at iteration {out['iterations']} (trained earlier in "
              f"{out['wall_time_s']:.0f} s); nothing was trained\n  checkpoint {out['checkpoint']}")
    else:
        val = out.get("val") or {}
        miou = f", val mIoU {val['val/mIoU']:.2f}" if val else ""
        attempts = f" over {out['attempts']} attempts" if out["attempts"] > 1 else ""
        print(f"{cfg.name}: {out['iterations']} iterations in {out['wall_time_s']:.0f} s{attempts}{miou}\n"
              f"  encoder init: {out['init']}, precision {out['amp']}\n"
              f"  checkpoint {out['checkpoint']}")
    return 0
