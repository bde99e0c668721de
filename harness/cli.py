"""The ``segrepro`` command line."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

from harness.config import InputError
from harness.interrupt import Interrupted


def _fmt(value: float | None, digits: int = 2) -> str:
    return "–" if value is None else f"{value:.{digits}f}"


def cmd_zoo(args: argparse.Namespace) -> int:
    from harness.zoo import zoo_table

    rows = zoo_table()
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    from tabulate import tabulate

    cols = [("paddlevit.miou_ss", "PVT ss"), ("reference.miou_ss", "OFF ss"), ("reference.miou_msflip", "OFF ms+flip"),
            ("mmseg.miou_ss", "MMS ss"), ("mmseg.miou_msflip", "MMS ms+flip"), ("reference.params", "OFF params M"),
            ("reference.fps", "OFF fps"), ("mmseg.fps", "MMS fps"), ("mmseg.train_memory", "MMS mem GB")]
    table = [[r["config"], _fmt(r["params_m"], 1)] + [_fmt(r["documented"].get(k)) for k, _ in cols] for r in rows]
    print(tabulate(table, headers=["config", "params M"] + [t for _, t in cols], disable_numparse=True))
    print("\nPVT = PaddleViT, OFF = reference code, MMS = MMSegmentation; documented figures from experiments/documented.yaml")
    return 0


def _read_image(path: Path):
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise InputError(f"{path}: no such image file")
    try:
        with Image.open(path) as im:
            return np.array(im.convert("RGB"))  # a writable copy: torch.from_numpy shares its memory
    except (UnidentifiedImageError, OSError) as e:
        raise InputError(f"{path}: not a readable image ({e})") from None


def _checkpoint_of(path: str) -> tuple[str, str | None]:
    """(the checkpoint file ``--checkpoint`` names, the data its run trained on): a reproduce
    configuration's run directory (RUN/configs/NAME-ID), a ``segrepro train`` run directory, or
    a checkpoint inside one, named on stderr; any other path as it is."""
    from harness.runs import run_checkpoint

    found = run_checkpoint(path)
    if found is None:
        return path, None
    print(found.describe(), file=sys.stderr)
    return str(found.checkpoint), found.data_root


def _config_of(ckpt_cfg, config: str | None, recipe: str | None, profile: str | None, overrides=None):
    """The config a command uses with a checkpoint: CONFIG, or the checkpoint's own. A segrepro
    checkpoint carries the resolved config of its run: used as it is unless CONFIG, --recipe or
    --profile says otherwise, and its recipe and profile stay where they are not given. A
    source's checkpoint (reference, MMSeg, PaddleViT) takes --recipe and --profile with CONFIG."""
    from harness.config import load_config

    ours = ckpt_cfg is not None and ckpt_cfg.source == "segrepro"
    if config is None:
        if ckpt_cfg is None:
            raise InputError("give CONFIG or --checkpoint")
        if not (recipe or profile or overrides):
            return ckpt_cfg
        if not ours:
            raise InputError(f"--recipe and --profile need CONFIG with a {ckpt_cfg.source} checkpoint, which "
                             f"carries its source's own config and protocol (eval: see also --protocol)")
    if ours:
        recipe, profile = recipe or ckpt_cfg.recipe, profile or ckpt_cfg.profile
    return load_config(config or ckpt_cfg.name, recipe=recipe, profile=profile, overrides=overrides)


def cmd_predict(args: argparse.Namespace) -> int:
    import numpy as np
    import torch

    from harness.atomic import atomic_path
    from harness.config import NORMALIZATION, normalization_name
    from harness.data.ade20k import colorize
    from harness.inference import make_views, slide_inference
    from harness.models import load_checkpoint

    image = _read_image(Path(args.image))
    overrides = {"attention": args.attention, "mask_step": args.attention} if args.attention else {}
    checkpoint, _ = _checkpoint_of(args.checkpoint)
    model, cfg = load_checkpoint(checkpoint, **overrides)
    cfg = _config_of(cfg, None, args.recipe, args.profile)
    e = cfg.eval
    scales, flip = (e.scales, e.flip) if args.ms_flip else ((1.0,), False)
    # the checkpoint source's own protocol: its evaluation normalisation and test resize
    stats = NORMALIZATION[normalization_name(e.normalization, cfg.model)]
    views, flipped = make_views(torch.from_numpy(image).permute(2, 0, 1), cfg.data.test_scale, stats["mean"],
                                stats["std"], scales, flip, e.resize, e.ratio_base if args.ms_flip else "test_scale")
    probs = slide_inference(model, views, flipped, image.shape[:2], cfg.eval.window, cfg.eval.stride,
                            cfg.eval.batch_size, cfg.eval.small_views)
    out = Path(args.out)
    with atomic_path(out) as tmp:
        colorize(probs.argmax(0).numpy()).save(tmp, format="PNG")
    if args.logits:
        with atomic_path(args.logits) as tmp, open(tmp, "wb") as f:
            np.save(f, probs.numpy().astype(np.float32))
    print(f"{out}: {image.shape[1]}x{image.shape[0]}, window {cfg.eval.window}, stride {cfg.eval.stride}, "
          f"scales {list(scales)}, flip {flip}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    import dataclasses

    from harness.config import apply_protocol
    from harness.evaluate import Protocol, run_eval
    from harness.models import load_checkpoint

    for flag, value in (("--limit", args.limit), ("--workers", args.workers)):
        if value is not None and value < 1:
            raise InputError(f"{flag} {value}: must be at least 1")
    checkpoint, trained_on = _checkpoint_of(args.checkpoint)
    data_root = args.data_root or trained_on
    if data_root is None:
        raise InputError("--data-root is needed (only a finished training's run directory tells its data)")
    if not Path(data_root).exists():
        raise InputError(f"--data-root {data_root}: no such directory")
    # the checkpoint's own config names its source and carries that source's protocol
    _, ckpt_cfg = load_checkpoint(checkpoint, args.source_config)
    cfg = _config_of(ckpt_cfg, args.config, args.recipe, args.profile,
                     _attention_overrides(args) if args.config else None)
    cfg = dataclasses.replace(cfg, source=ckpt_cfg.source)
    if args.attention and not args.config:
        cfg = dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, attention=args.attention,
                                                                  mask_step=args.attention))
    if args.protocol:
        cfg = apply_protocol(cfg, args.protocol)
    protocol = Protocol.of(cfg, args.ms_flip)
    if not args.json:
        print(f"{cfg.name} ({cfg.source} checkpoint; {cfg.recipe} recipe, {cfg.profile} profile) "
              f"{protocol.describe()}", file=sys.stderr)
    out = args.out or Path("runs") / "eval" / f"{cfg.name}-{cfg.eval.protocol}"
    tracker = None
    if args.run_dir or args.tracking_uri:
        from harness.tracking import Tracker, default_tracking_uri

        tracker = Tracker(args.tracking_uri or default_tracking_uri(args.run_dir), args.run_dir)
    try:
        record = run_eval(checkpoint, cfg, data_root, args.ms_flip, args.limit, args.workers, out,
                          progress=not args.json, source_config=args.source_config)
    except (FileNotFoundError, ValueError) as e:
        if isinstance(e, InputError):
            raise
        raise InputError(str(e)) from None
    if tracker is not None:
        record["run_id"] = tracker.log_eval(cfg, record)
    if args.json:
        print(json.dumps({k: v for k, v in record.items() if k != "per_class"}, indent=2))
    else:
        print(f"{cfg.name}: mIoU {record['mIoU']:.2f}, mAcc {record['mAcc']:.2f}, aAcc {record['aAcc']:.2f} "
              f"over {record['images']} images ({record['images_per_s']:.2f} img/s"
              + (f", model {record['model_share']:.1%} of the loop's wall time" if record["model_share"] else "")
              + f")\n  {protocol.describe()}\n"
              f"  results in {out}" + (f", MLflow run {record['run_id']}" if tracker else ""))
    return 0


def _attention_overrides(args: argparse.Namespace) -> dict:
    a = getattr(args, "attention", None)
    return {"model": {"attention": a, "mask_step": a}} if a else {}


def cmd_bench(args: argparse.Namespace) -> int:
    if args.suite == "inference":
        from harness.reproduce import resolve_configs
        from harness.speed import format_suite, run_suite

        h, _, w = args.image.partition("x")
        if not (h.isdigit() and w.isdigit()):
            raise InputError(f"--image {args.image!r}: expected HEIGHTxWIDTH, e.g. 512x683")
        result = run_suite(resolve_configs(args.configs), args.works.split(","), (int(h), int(w)), args.threads,
                           1 if args.warmup is None else args.warmup, 5 if args.repeats is None else args.repeats)
        print(json.dumps(result, indent=2) if args.json else format_suite(result))
        return 0
    from harness.benchmark import benchmark, benchmark_train, format_result, format_train_result
    from harness.models import load_checkpoint

    checkpoint, ckpt_cfg = args.checkpoint, None
    if checkpoint:
        checkpoint, _ = _checkpoint_of(checkpoint)
        ckpt_cfg = load_checkpoint(checkpoint)[1]
    cfg = _config_of(ckpt_cfg, args.config, args.recipe, args.profile,
                     overrides={"optim": {"amp": args.amp}} if args.amp else None)
    b = cfg.bench  # the run's benchmark protocol where an option does not say otherwise
    warmup = b.warmup if args.warmup is None else args.warmup
    repeats = b.repeats if args.repeats is None else args.repeats
    results, blocks = {}, []
    if args.mode in ("inference", "both"):
        results["inference"] = benchmark(cfg, checkpoint, args.batch_size or b.batch_size, args.image_size,
                                         args.precision or b.precision, args.attention, warmup, repeats)
        blocks.append(format_result(results["inference"]))
    if args.mode in ("train", "both"):
        results["train"] = benchmark_train(cfg, None, args.workers, warmup, repeats)
        blocks.append(format_train_result(results["train"]))
    if args.json:
        print(json.dumps(results if args.mode == "both" else results[args.mode], indent=2))
    else:
        print("\n".join(blocks))
    return 0


def cmd_reproduce(args: argparse.Namespace) -> int:
    from harness.reproduce import Options, reproduce, resolve_configs

    run_dir = Path(args.run_dir).resolve()
    opts = Options(configs=resolve_configs(args.configs), data_root=Path(args.data_root).resolve(), run_dir=run_dir,
                   profile=args.profile, recipe=args.recipe, address=args.address, tracking_uri=args.tracking_uri,
                   force=args.force, workers=args.workers, gpus_per_worker=args.gpus_per_worker,
                   backbone_dir=Path(args.backbone_dir) if args.backbone_dir else None,
                   from_scratch=args.from_scratch, amp=args.amp, argv=sys.argv[1:])
    if args.preflight:
        from harness.preflight import format_report
        from harness.reproduce import preflight

        result = preflight(opts, args.preflight_iterations, progress=not args.json)
        print(json.dumps(result, indent=2) if args.json else format_report(result))
        return 0 if result["ok"] else 1
    from harness.lock import RunLock
    from reports.build import build_report

    start = time.perf_counter()
    report_dir = run_dir / "report"
    with RunLock(run_dir, "segrepro reproduce"):
        outcomes, uri = reproduce(opts)
        build_report(uri, report_dir)
    seconds = time.perf_counter() - start
    summary = {"outcomes": outcomes, "wall_time_s": seconds, "tracking_uri": uri, "report": str(report_dir / "report.html")}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        from harness.reproduce import format_outcomes

        print(format_outcomes(outcomes))
        counts = {s: sum(o["status"] == s for o in outcomes) for s in ("finished", "skipped", "failed")}
        print(f"reproduce: {counts['finished']} finished, {counts['skipped']} skipped, {counts['failed']} failed "
              f"in {seconds:.0f} s")
        print(f"report: {report_dir / 'report.md'} and {report_dir / 'report.html'}")
        ui = f"mlflow ui --backend-store-uri {uri}" if uri.startswith("sqlite") else f"open {uri}"
        print(f"MLflow: {ui}")
    failed = [o for o in outcomes if o["status"] == "failed"]
    for o in failed:
        if o.get("user_error"):  # bad input met during the run: the command's user error too
            print(f"segrepro: error: {o['error']}\nsegrepro: full traceback in {o['log']}", file=sys.stderr)
    return 2 if any(o.get("user_error") for o in failed) else 1 if failed else 0


def _weights_configs(args: argparse.Namespace) -> list:
    from harness.config import load_config
    from harness.reproduce import resolve_configs

    return [load_config(name) for name in resolve_configs(args.configs)]


def weights_table(cfgs: list, backbone_dir: str | None) -> list[dict]:
    """Per configuration: the source's pretrained tag, the file that would be loaded, its SHA-256."""
    from harness import weights

    rows = []
    for cfg in cfgs:
        found = weights.locate(cfg, backbone_dir)
        rows.append({"config": cfg.name, "backbone": cfg.model.backbone, "tag": cfg.model.pretrained,
                     "file": str(found.path) if found else None, "origin": found.origin if found else None,
                     "sha256": found.sha256 if found else None,
                     "missing": None if found else weights.missing_message(cfg, backbone_dir)})
    return rows


def cmd_weights_check(args: argparse.Namespace) -> int:
    from harness import weights

    rows = weights_table(_weights_configs(args), args.backbone_dir)
    if args.json:
        print(json.dumps(rows, indent=2))
    else:
        where = f"the Hugging Face cache {weights.hub_cache_dir()}" + (
            f" or {args.backbone_dir}" if args.backbone_dir else "")
        for r in rows:
            print(f"{r['config']}: {r['tag'] or r['backbone'] + ' (never published)'}")
            print(f"  {r['origin']}: {r['file']}\n  sha256 {r['sha256']}" if r["file"] else f"  MISSING from {where}")
        fetchable = [r["config"] for r in rows if not r["file"] and r["tag"]]
        if fetchable:
            print(f"fetch with: segrepro weights fetch --configs {','.join(fetchable)}")
        if any(not r["file"] and not r["tag"] for r in rows):
            print("a checkpoint that was never published must be given with --backbone-dir (a file named BACKBONE.pth)")
    return 1 if any(r["file"] is None for r in rows) else 0


def cmd_weights_fetch(args: argparse.Namespace) -> int:
    from harness import weights

    cfgs = _weights_configs(args)
    tags = list(dict.fromkeys(c.model.pretrained for c in cfgs if c.model.pretrained))
    for cfg in cfgs:
        if not cfg.model.pretrained:
            print(f"{cfg.name}: {cfg.model.backbone} was never published; nothing to fetch (pass --backbone-dir)",
                  file=sys.stderr)
    failed = []
    for tag in tags:
        print(f"{tag}: fetching into {weights.hub_cache_dir()}", file=sys.stderr)
        try:
            weights.fetch(tag)
        except weights.FetchError as e:
            print(f"segrepro: error: {e}", file=sys.stderr)
            failed.append(tag)
    ok = [c for c in cfgs if c.model.pretrained and c.model.pretrained not in failed]
    for r in weights_table(ok, None):
        print(f"{r['config']}: {r['file']}\n  sha256 {r['sha256']}")
    return 1 if failed else 0


def _zoo_model_dims():
    from harness.config import load_config, zoo_names
    from kernels.profile import ModelDims

    dims = []
    for name in zoo_names():
        m = load_config(name).model
        dims.append(ModelDims(name=name, d_model=m.d_model, n_heads=m.n_heads, patch_size=m.patch_size,
                              n_extra_tokens=2 if m.distilled else 1, n_cls=m.n_cls,
                              decoder="mask" if m.decoder.name == "mask_transformer" else "linear",
                              n_dec_heads=max(m.d_model // 64, 1)))
    return dims


def cmd_kernels_profile(args: argparse.Namespace) -> int:
    from harness.atomic import write_text
    from kernels import profile

    tracker = None
    if args.tracking_uri:  # checked before the sweep, which may take long
        from harness.tracking import Tracker

        tracker = Tracker(args.tracking_uri)
    try:
        result = profile.measure(args, _zoo_model_dims())
    except profile.ProfileError as e:
        raise InputError(f"kernels profile: {e}") from None
    table = profile.csv_text(result.rows)
    csv_path = write_text(args.out / profile.CSV_NAME[result.kind], table) if args.out is not None else None
    if tracker is not None:
        tracker.log_kernel_profile(result.kind, result.facts, result.rows, table,
                                   {"shapes": args.shapes, "dtype": args.dtype or "default"})
    profile.show(result, args.json, csv_path)
    return 0 if result.passed else 1


def cmd_kernels_compile(args: argparse.Namespace) -> int:
    from kernels import compile as kernels_compile

    try:
        return kernels_compile.run(args)
    except kernels_compile.CompileError as e:
        raise InputError(f"kernels compile: {e}") from None


class _Version(argparse.Action):
    """``--version``: the git commit is looked up only when asked for."""

    def __init__(self, option_strings, dest, **kwargs):
        super().__init__(option_strings, dest, nargs=0, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        from harness.logs import version

        print(version())
        parser.exit()


def _zoo_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=cmd_zoo)



def _predict_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, help="a configuration's run directory (RUN/configs/NAME-ID: its "
                   "config and protocol), a train run directory, a reference run directory, or a checkpoint.pth")
    p.add_argument("--image", required=True, help="image file (JPEG, PNG, ...)")
    p.add_argument("--profile", help="run profile whose evaluation settings to use (default: the checkpoint's)")
    p.add_argument("--recipe", help="named recipe whose evaluation settings to use (default: the checkpoint's)")
    p.add_argument("--ms-flip", action="store_true", help="multi-scale + flip views (the config's scales)")
    p.add_argument("--out", required=True, help="output mask PNG, coloured with the ADE20K palette")
    p.add_argument("--logits", help="also save the class probabilities [C, H, W] as float32 .npy")
    p.add_argument("--attention", choices=["torch", "triton"], help="attention and mask-step implementation (default: the config's)")
    p.set_defaults(func=cmd_predict)


def _eval_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="zoo configuration name or YAML path whose evaluation protocol to use "
                                             "(default: the checkpoint's own config and its source's protocol)")
    p.add_argument("--checkpoint", required=True, help="a configuration's run directory (RUN/configs/NAME-ID: its "
                   "config, protocol and data), a train run directory, a reference run directory or checkpoint.pth, "
                   "a segrepro checkpoint, an MMSeg .pth (dumped .py config beside it) or a PaddleViT .pdparams "
                   "(yaml beside it)")
    p.add_argument("--source-config", help="the MMSeg .py config or PaddleViT yaml of the checkpoint, when not beside it")
    p.add_argument("--protocol", help="evaluate under this source's protocol: a recipe name (reference, mmseg, "
                                      "paddlevit); default: the checkpoint source's own")
    p.add_argument("--data-root", help="directory holding ADEChallengeData2016 (or that directory); default: the "
                                       "data a run directory given as --checkpoint was trained on")
    p.add_argument("--ms-flip", action="store_true", help="multi-scale + flip (the config's scales)")
    p.add_argument("--recipe", help="named recipe (reference, mmseg, paddlevit); default: a segrepro checkpoint's own")
    p.add_argument("--profile", help="run profile (full, smoke); default: a segrepro checkpoint's own")
    p.add_argument("--run-dir", help="also log the result to the MLflow store RUN_DIR/mlflow.db (segrepro report reads it)")
    p.add_argument("--tracking-uri", help="also log the result to this MLflow store")
    p.add_argument("--limit", type=int, help="only the first N validation images")
    p.add_argument("--workers", type=int, default=1, help="shard the split over N Ray workers")
    p.add_argument("--attention", choices=["torch", "triton"], help="attention and mask-step implementation")
    p.add_argument("--out", help="directory for <mode>_metrics.json and <mode>_per_class.csv")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON")
    p.set_defaults(func=cmd_eval)



def _bench_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="zoo configuration name or YAML path (default: the checkpoint's)")
    p.add_argument("--suite", choices=["model", "inference"], default="model",
                   help="model: one configuration's figures (default); inference: forward, sliding window and "
                        "ms+flip of one image for each of --configs on this CPU (harness/speed.py)")
    p.add_argument("--configs", default="seg_tiny_mask,seg_base_mask", help="--suite inference: NAME,NAME,...")
    p.add_argument("--works", default="forward,slide,msflip", help="--suite inference: which workloads")
    p.add_argument("--image", default="512x683", help="--suite inference: image size HxW (default ADE-sized)")
    p.add_argument("--threads", type=int, default=2, help="--suite inference: torch threads")
    p.add_argument("--checkpoint", help="weights to time, or a configuration's run directory (RUN/configs/NAME-ID: "
                   "its config and benchmark settings); default: freshly initialised (speed does not depend on them)")
    p.add_argument("--recipe", help="named recipe (default: a segrepro checkpoint's own)")
    p.add_argument("--profile", help="run profile (default: a segrepro checkpoint's own)")
    p.add_argument("--mode", choices=["inference", "train", "both"], default="inference",
                   help="time inference (forward and sliding window), training steps, or both")
    p.add_argument("--workers", type=int, default=1,
                   help="train mode: the per-worker batch is the global optim.batch_size over this many workers")
    p.add_argument("--amp", choices=["fp32", "fp16", "bf16"],
                   help="train mode: training precision (default: the config's optim.amp; CPUs train in fp32)")
    p.add_argument("--batch-size", type=int, help="inference mode: forward batch (default: the config's "
                                                  "bench.batch_size)")
    p.add_argument("--image-size", type=int, help="square input size of the forward timing (default: the window)")
    p.add_argument("--precision", choices=["fp32", "fp16", "bf16"], help="default: the config's bench.precision")
    p.add_argument("--attention", choices=["torch", "triton"], help="attention and mask-step implementation")
    p.add_argument("--warmup", type=int, help="discarded runs (default: the config's bench.warmup; 1 for --suite "
                                              "inference)")
    p.add_argument("--repeats", type=int, help="timed runs (default: the config's bench.repeats; 5 for --suite "
                                               "inference)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_bench)


def _train_arguments(p: argparse.ArgumentParser) -> None:
    from harness.train import command as train

    train.add_arguments(p)
    p.set_defaults(func=train.run)


def _runs_arguments(p: argparse.ArgumentParser) -> None:
    from harness.contract import DEFAULT_RUN_DIR
    from harness.runs import cmd_runs

    p.add_argument("--run-dir", default=DEFAULT_RUN_DIR, help=f"the run directory (default {DEFAULT_RUN_DIR})")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_runs)


def _reproduce_arguments(p: argparse.ArgumentParser) -> None:
    from harness.preflight import MEASURED_ITERATIONS
    from harness.contract import DEFAULT_RUN_DIR
    from harness.train import command as train

    p.add_argument("--configs", default="all", help="all, seed (the five seed rows), or NAME,NAME,...")
    p.add_argument("--profile", help="run profile: full or smoke (default: the config's, full)")
    p.add_argument("--recipe", help="named recipe (reference, mmseg, paddlevit)")
    p.add_argument("--data-root", required=True, help="directory holding ADEChallengeData2016 (or that directory)")
    p.add_argument("--address", help="Ray cluster to join (default: start an embedded local Ray)")
    p.add_argument("--tracking-uri", help="MLflow store (default: sqlite:///RUN_DIR/mlflow.db)")
    p.add_argument("--run-dir", default=DEFAULT_RUN_DIR, help="checkpoints, results, the MLflow store and the report")
    p.add_argument("--workers", type=int, default=1, help="training workers (DDP ranks) per configuration")
    p.add_argument("--gpus-per-worker", type=float, default=0, help="GPUs per training worker")
    train.add_init_arguments(p)
    p.add_argument("--force", action="store_true", help="rerun configurations that already have a finished run")
    p.add_argument("--preflight", action="store_true", help="check everything and measure what each configuration "
                   "will cost, then stop (exit 0 only when every check passed)")
    p.add_argument("--preflight-iterations", type=int, default=MEASURED_ITERATIONS, metavar="N",
                   help=f"training iterations measured per configuration after one warm-up (default {MEASURED_ITERATIONS})")
    p.add_argument("--json", action="store_true", help="print the outcome as JSON")
    p.set_defaults(func=cmd_reproduce)


def _weights_arguments(wts: argparse.ArgumentParser) -> None:
    wts_sub = wts.add_subparsers(dest="weights_command", required=True, metavar="ACTION")
    p = wts_sub.add_parser("fetch", help="download them through timm into the Hugging Face cache")
    p.add_argument("--configs", default="all", help="all, seed (the five seed rows), or NAME,NAME,...")
    p.set_defaults(func=cmd_weights_fetch)
    p = wts_sub.add_parser("check", help="per configuration: tag, cached file and SHA-256 (exit 1 if any is missing)")
    p.add_argument("--configs", default="all", help="all, seed (the five seed rows), or NAME,NAME,...")
    p.add_argument("--backbone-dir", help="also look in this directory (files named by tag or timm model name)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_weights_check)


def _data_arguments(data: argparse.ArgumentParser) -> None:
    from harness.data import bench, check, download, synth

    data_sub = data.add_subparsers(dest="data_command", required=True, metavar="ACTION")
    for name, module, text in (("check", check, "verify a dataset's layout and files"),
                               ("download", download, "download and extract ADEChallengeData2016.zip"),
                               ("synth", synth, "write a generated dataset in the ADE20K layout"),
                               ("bench", bench, "images per second of the training pipeline")):
        p = data_sub.add_parser(name, help=text)
        module.add_arguments(p)
        p.set_defaults(func=module.run)


def _report_arguments(p: argparse.ArgumentParser) -> None:
    from reports import build as report_build

    report_build.add_arguments(p)
    p.set_defaults(func=report_build.run)


def _kernels_arguments(kern: argparse.ArgumentParser) -> None:
    from kernels import profile

    kern_sub = kern.add_subparsers(dest="kernels_command", required=True, metavar="ACTION")
    p = kern_sub.add_parser("profile", help="time the kernels against PyTorch on this GPU (correctness check without one)")
    profile.add_arguments(p)
    p.set_defaults(func=cmd_kernels_profile)
    p = kern_sub.add_parser("compile", help="compile every kernel config for GPU targets (no GPU needed): "
                                            "registers, spills, shared memory")
    from kernels import compile as kernels_compile

    kernels_compile.add_arguments(p)
    p.set_defaults(func=cmd_kernels_compile)


# name, one-line help, the function that adds its arguments (called only for the chosen
# command: building every command's arguments would import torch, Ray and MLflow for --help)
COMMANDS = (
    ("zoo", "list the zoo configurations with their documented figures", _zoo_arguments),
    ("predict", "segment one image with a checkpoint", _predict_arguments),
    ("eval", "mIoU of a checkpoint on the validation split (ss or ms+flip), under any source's protocol",
     _eval_arguments),
    ("bench", "throughput, latency, FLOPs, parameters and peak memory of a zoo model", _bench_arguments),
    ("train", "train one configuration with Ray Train (DDP, checkpoints, resume)", _train_arguments),
    ("reproduce", "every configuration: train, eval ss and ms+flip, benchmark; then the report", _reproduce_arguments),
    ("runs", "every configuration of a reproduce run directory: status, stage, checkpoint, figures", _runs_arguments),
    ("weights", "the ImageNet backbone checkpoints the zoo starts from", _weights_arguments),
    ("data", "ADE20K: download, check, generate, benchmark the pipeline", _data_arguments),
    ("report", "documented against reproduced: Markdown, HTML, CSV and plots from MLflow runs", _report_arguments),
    ("kernels", "Triton kernels", _kernels_arguments),
)


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The parser for ``argv``: every command is listed, but only the one ``argv`` names gets its
    arguments (None: all of them, for tools that read the whole parser)."""
    parser = argparse.ArgumentParser(prog="segrepro", description=(
                                     "Reproduce, benchmark and profile the Segmenter ADE20K model zoo."))
    parser.add_argument("--version", action=_Version, help="print the package version and git commit, then exit")
    parser.add_argument("--debug", action="store_true", help="print the full traceback of a failure (always in the log)")
    parser.add_argument("--verbose", action="store_true", help="show Ray's, MLflow's and other libraries' INFO "
                                                               "output and warnings")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    chosen = None if argv is None else next((a for a in argv if not a.startswith("-")), "")
    for name, text, add_arguments in COMMANDS:
        p = sub.add_parser(name, help=text, description=text)
        if chosen is None or chosen == name:
            add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line's error boundary: bad input and failures met during a run become one
    message and exit 2 (harness/errors.py), Ctrl-C exit 130."""
    # segrepro starts or joins Ray explicitly (harness.raylib); a Ray call after Ctrl-C stopped
    # it must fail, not silently start or join another cluster. Read when ray is first imported.
    os.environ.setdefault("RAY_ENABLE_AUTO_CONNECT", "0")
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
    from harness import logs

    logs.configure(args.verbose)
    try:
        return int(args.func(args) or 0)
    except Interrupted as e:
        print(f"segrepro: {e}", file=sys.stderr)
        return 130
    except KeyboardInterrupt:
        print("segrepro: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        from harness.errors import report

        return report(e, getattr(args, "run_dir", None), argv, args.debug)


if __name__ == "__main__":
    sys.exit(main())
