"""Single-scale and multi-scale+flip evaluation on ADE20K with a streaming confusion matrix,
on one process, sharded over Ray workers, or inside a torch.distributed job."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Union

import numpy as np
import torch
import torch.nn as nn
import torchvision.transforms.v2.functional as TF
from tqdm import tqdm

from harness.atomic import write_text
from harness.config import NORMALIZATION, Config, normalization_name
from harness.data.ade20k import ADE20K, CLASSES
from harness.inference import keep_freed_memory, make_views, slide_inference, view_size
from harness.metrics import ConfusionMatrix

# dataset item -> predicted classes [H, W] scored against the item's label, or (classes, the
# label they are scored against) where the protocol scores at another resolution
Predictor = Callable[[dict], Union[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]]
# called with (images done, images in all) after every image
OnImage = Callable[[int, int], None]


@dataclass(frozen=True)
class Protocol:
    """What produced an mIoU: printed and saved beside every result (EvalConfig's fields)."""

    mode: str  # "ss" or "msflip"
    window: int
    stride: int
    test_scale: int
    scales: tuple[float, ...]
    flip: bool
    small_views: str
    name: str = "reference"
    resize: str = "fit"
    ratio_base: str = "test_scale"
    label_resolution: str = "original"
    normalization: str | None = None  # the rule; the statistics used are in the result record
    bookkeeping: str = "mmseg"

    @classmethod
    def of(cls, cfg: Config, ms_flip: bool) -> "Protocol":
        e = cfg.eval
        # the ratio base is a rule of the multi-scale views; a single scale is the test resize
        return cls("msflip" if ms_flip else "ss", e.window, e.stride, cfg.data.test_scale,
                   tuple(e.scales) if ms_flip else (1.0,), e.flip if ms_flip else False, e.small_views,
                   e.protocol, e.resize, e.ratio_base if ms_flip else "test_scale", e.label_resolution,
                   e.normalization, e.bookkeeping)

    @classmethod
    def during_training(cls, cfg: Config) -> "Protocol":
        """Single scale with the source's training-time stride (``eval.train_stride``)."""
        p = cls.of(cfg, ms_flip=False)
        return dataclasses.replace(p, stride=p.window) if cfg.eval.train_stride == "window" else p

    def describe(self) -> str:
        return (f"{self.name} protocol, {self.mode}: window {self.window}, stride {self.stride}, "
                f"test scale {self.test_scale} ({self.resize}), scales {list(self.scales)} of {self.ratio_base}, "
                f"flip {self.flip}, small views {self.small_views}, labels {self.label_resolution}, "
                f"normalisation {self.normalization or 'as trained'}, bookkeeping {self.bookkeeping}")


class ModelPredictor:
    """Dataset item (uint8 image [H, W, 3]) -> predicted classes at the original resolution, or
    (classes, label) both at the single-scale view's size when the protocol scores there.
    ``cfg`` describes the model (its normalisation and backbone resolve the protocol's rule).

    ``prepare`` is the CPU side (the normalised views): a loader worker runs it ahead of the model;
    an item that was not prepared has its views built on the model's device."""

    def __init__(self, model: nn.Module, cfg: Config, protocol: Protocol, device: torch.device | str = "cpu"):
        stats = NORMALIZATION[normalization_name(protocol.normalization, cfg.model)]
        self.model, self.cfg, self.protocol, self.device = model, cfg, protocol, device
        self.mean, self.std = stats["mean"], stats["std"]

    def prepare(self, item: dict, device: torch.device | str = "cpu") -> dict:
        p = self.protocol
        img = torch.from_numpy(np.ascontiguousarray(item["image"])).permute(2, 0, 1).to(device)
        views, flipped = make_views(img, p.test_scale, self.mean, self.std, p.scales, p.flip, p.resize,
                                    p.ratio_base)
        return {**item, "views": views, "flipped": flipped}

    def __call__(self, item: dict):
        p = self.protocol
        if "views" not in item:
            item = self.prepare(item, self.device)
        out_size = item["image"].shape[:2]
        if p.label_resolution == "resized":
            # PaddleViT resizes the label (nearest) with the image and scores at that size
            out_size = view_size(*out_size, p.test_scale, 1.0, p.resize)
        views = [v.to(self.device) for v in item["views"]]
        probs = slide_inference(self.model, views, item["flipped"], out_size, p.window, p.stride,
                                self.cfg.eval.batch_size, p.small_views)
        pred = probs.argmax(0).cpu()
        if p.label_resolution != "resized":
            return pred
        label = torch.from_numpy(np.ascontiguousarray(item["label"]))[None]
        return pred, TF.resize(label, list(out_size), interpolation=TF.InterpolationMode.NEAREST)[0]


def model_predictor(model: nn.Module, cfg: Config, protocol: Protocol,
                    device: torch.device | str = "cpu") -> ModelPredictor:
    return ModelPredictor(model, cfg, protocol, device)


class _Prepared(torch.utils.data.Dataset):
    """The first ``n`` items of ``dataset``, decoded and prepared in a loader worker."""

    def __init__(self, dataset: ADE20K, prepare: Callable[[dict], dict], n: int):
        self.dataset, self.prepare, self.n = dataset, prepare, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> dict:
        return self.prepare(self.dataset[i])


def _as_is(item: dict) -> dict:
    return item


def evaluate_dataset(predict: Predictor, dataset: ADE20K, num_classes: int = 150, limit: int | None = None,
                     progress: bool = True, desc: str = "eval", loader_workers: int = 0,
                     timing: dict | None = None, on_image: OnImage | None = None) -> ConfusionMatrix:
    """Accumulate one confusion matrix over (the first ``limit`` items of) ``dataset``.

    ``loader_workers > 0``: a torch DataLoader decodes the images and builds the views (a
    predictor's ``prepare``) in that many worker processes while the model runs. ``timing``, if
    given, receives ``model_s`` (seconds inside ``predict``) and ``wall_s``; ``on_image(done,
    total)`` is called after every image."""
    cm = ConfusionMatrix(num_classes)
    n = len(dataset) if limit is None else min(limit, len(dataset))
    prepare = getattr(predict, "prepare", None)
    if prepare is not None and loader_workers > 0:
        items = iter(torch.utils.data.DataLoader(_Prepared(dataset, prepare, n), batch_size=None,
                                                 num_workers=loader_workers, collate_fn=_as_is, prefetch_factor=2))
    else:
        items = (dataset[i] for i in range(n))
    start, model_s = time.perf_counter(), 0.0
    for done, item in enumerate(tqdm(items, total=n, desc=desc, unit="img", disable=not progress,
                                     dynamic_ncols=True), 1):
        t = time.perf_counter()
        out = predict(item)
        model_s += time.perf_counter() - t
        pred, label = out if isinstance(out, tuple) else (out, torch.from_numpy(item["label"]))
        cm.update(pred, label)
        if on_image is not None:
            on_image(done, n)
    if timing is not None:
        timing.update(model_s=model_s, wall_s=time.perf_counter() - start)
    return cm


def all_reduce_confusion(cm: ConfusionMatrix) -> ConfusionMatrix:
    """Sum the ranks' matrices once when running inside torch.distributed (gloo or NCCL)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        backend = dist.get_backend()
        mat = cm.mat.cuda() if backend == "nccl" else cm.mat
        dist.all_reduce(mat)
        cm.mat = mat.cpu()
    return cm


def evaluate_checkpoint(checkpoint: str | os.PathLike, cfg: Config, data_root: str | os.PathLike,
                        ms_flip: bool = False, limit: int | None = None, workers: int = 1,
                        progress: bool = True, ray_address: str | None = None,
                        source_config: str | os.PathLike | None = None,
                        timing: dict | None = None,
                        on_image: OnImage | None = None) -> tuple[ConfusionMatrix, Protocol, int]:
    """Evaluate a checkpoint (any format ``load_checkpoint`` reads; ``source_config`` for an
    MMSeg or PaddleViT one whose config is elsewhere) on the validation split of ``data_root``
    with ``cfg``'s protocol; ``on_image`` follows a single-process evaluation image by image.

    ``workers > 1`` shards the split over Ray tasks (``harness.stages``: one evaluation's
    resources each), each accumulating its own matrix; the matrices are merged once.
    ``timing`` (one process only) receives the model's and the wall seconds (``evaluate_dataset``).
    """
    protocol = Protocol.of(cfg, ms_flip)
    dataset = ADE20K(data_root, "validation")
    dataset = dataset if limit is None else dataset.head(limit)
    source_config = None if source_config is None else str(source_config)
    if workers <= 1:
        return (_evaluate_shard(str(checkpoint), cfg, protocol, dataset, progress, source_config, timing, on_image),
                protocol, len(dataset))
    from harness.raylib import ensure_ray
    from harness.stages import run_eval_shards

    ensure_ray(ray_address)
    shards = [dataset.shard(r, workers) for r in range(workers)]
    total = ConfusionMatrix(cfg.model.n_cls)
    for cm in run_eval_shards(str(checkpoint), cfg, protocol, shards, source_config):
        total.merge(cm)
    return total, protocol, len(dataset)


def _evaluate_shard(checkpoint: str, cfg: Config, protocol: Protocol, dataset: ADE20K,
                    progress: bool, source_config: str | None = None, timing: dict | None = None,
                    on_image: OnImage | None = None) -> ConfusionMatrix:
    from harness.models import load_checkpoint

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model, ckpt_cfg = load_checkpoint(checkpoint, source_config, attention=cfg.model.attention,
                                      mask_step=cfg.model.mask_step)
    model.to(device)
    keep_freed_memory()
    # the protocol's normalisation rule is resolved for the checkpoint's own model
    predict = model_predictor(model, ckpt_cfg, protocol, device)
    # one loader worker decodes and builds the next image's views while the model runs
    return evaluate_dataset(predict, dataset, ckpt_cfg.model.n_cls, progress=progress, desc=protocol.mode,
                            loader_workers=1, timing=timing, on_image=on_image)


def result_record(cm: ConfusionMatrix, protocol: Protocol, cfg: Config, images: int, seconds: float) -> dict:
    """The figures with the checkpoint's source, the protocol (every rule) and the statistics
    the images were normalised with (``cfg`` describes the evaluated checkpoint)."""
    out = cm.compute(protocol.bookkeeping)
    return {
        "config": cfg.name, "recipe": cfg.recipe, "source": cfg.source,
        "protocol": protocol.__dict__ | {"scales": list(protocol.scales)},
        "normalization": normalization_name(protocol.normalization, cfg.model),
        "mIoU": out["mIoU"], "mAcc": out["mAcc"], "aAcc": out["aAcc"], "images": images,
        "seconds": seconds, "images_per_s": images / seconds if seconds else None,
        "per_class": [{"class": name, "IoU": iou, "Acc": acc}
                      for name, iou, acc in zip(CLASSES, out["IoU"], out["Acc"])],
    }


def write_result(out_dir: str | os.PathLike, record: dict) -> tuple[Path, Path]:
    """``<mode>_metrics.json`` (metrics + protocol) and ``<mode>_per_class.csv`` (class, IoU, Acc)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    mode = record["protocol"]["mode"]
    metrics_path, csv_path = out_dir / f"{mode}_metrics.json", out_dir / f"{mode}_per_class.csv"
    summary = {k: v for k, v in record.items() if k != "per_class"}
    write_text(metrics_path, json.dumps(summary, indent=2) + "\n")
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=["class", "IoU", "Acc"])
    writer.writeheader()
    writer.writerows(record["per_class"])
    write_text(csv_path, buf.getvalue())
    return metrics_path, csv_path


def run_eval(checkpoint, cfg: Config, data_root, ms_flip: bool, limit: int | None, workers: int,
             out_dir, progress: bool = True, ray_address: str | None = None, source_config=None,
             on_image: OnImage | None = None) -> dict:
    start, timing = time.perf_counter(), {}
    cm, protocol, images = evaluate_checkpoint(checkpoint, cfg, data_root, ms_flip, limit, workers, progress,
                                               ray_address, source_config, timing, on_image)
    record = result_record(cm, protocol, cfg, images, time.perf_counter() - start)
    # the model's share of the evaluation loop's wall time (None when sharded over Ray workers)
    record["model_share"] = timing["model_s"] / timing["wall_s"] if timing.get("wall_s") else None
    record["checkpoint"] = str(Path(checkpoint).resolve())
    record["data_root"] = str(Path(data_root).resolve())  # the writer records which data this was
    if out_dir is not None:
        write_result(out_dir, record)
    return record

