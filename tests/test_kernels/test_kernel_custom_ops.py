"""The kernels as torch.library custom ops: registrations, and FLOPs counted as the torch path.

The kernels are torch.library custom ops with FLOP formulas, so a Segmenter model's FLOPs do
not depend on which attention / mask-step implementation it runs. The model is counted on the
meta device (the ops' fake implementations: no kernel runs); small real calls check that the
kernels count as torch's own ops doing the same work.
"""

import dataclasses
import sys

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import kernels
from harness.benchmark import count_flops
from harness.config import load_config
from harness.models import build_model


def _model_flops(impl: str) -> tuple[int, dict]:
    cfg = dataclasses.replace(load_config("seg_tiny_mask").model, attention=impl, mask_step=impl)
    with torch.device("meta"):
        model = build_model(cfg).eval()
    with FlopCounterMode(display=False) as counter:
        total = count_flops(model, torch.empty(1, 3, 512, 512, device="meta"))
    return total, {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


def test_segmenter_flops_equal_on_torch_and_triton_paths():
    torch_total, _ = _model_flops("torch")
    triton_total, by_op = _model_flops("triton")
    assert triton_total == torch_total
    # Not vacuous: without their formulas the Triton ops would count nothing.
    assert by_op["segrepro.flash_attention_fwd"] > 0 and by_op["segrepro.mask_logits_fwd"] > 0


def _flops(fn, *args) -> int:
    with FlopCounterMode(display=False) as counter:
        out = fn(*args)
        out.backward(torch.ones_like(out))
    return counter.get_total_flops()


def _efficient_sdpa(q, k, v):
    # torch's memory-efficient attention: on a GPU SDPA runs it (or flash), counted alike.
    return torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True)[0]


def test_attention_counts_as_torch_fused_attention(device):
    # Forward and backward (FlashAttention's backward recomputes the scores: 2.5x the forward).
    def inputs(dev):
        return [torch.randn(1, 2, 40, 16, device=dev, requires_grad=True) for _ in range(3)]

    torch_flops = _flops(_efficient_sdpa, *inputs("meta"))
    assert _flops(kernels.attention, *inputs("meta")) == torch_flops > 0
    assert _flops(kernels.attention, *inputs(device)) == torch_flops


def test_mask_step_counts_as_the_unfused_torch_sequence(device):
    def run(dev, fused):
        patches = torch.randn(2, 40, 32, device=dev, requires_grad=True)
        classes = torch.randn(2, 19, 32, device=dev, requires_grad=True)
        w, b = torch.ones(19, device=dev), torch.zeros(19, device=dev)
        if fused:
            return _flops(lambda p, c: kernels.mask_logits(p, c, w, b), patches, classes)
        return _flops(lambda p, c: F.layer_norm(
            F.normalize(p, dim=-1) @ F.normalize(c, dim=-1).transpose(1, 2), (19,), w, b), patches, classes)

    assert run(device, True) == run("meta", True) == run("meta", False) > 0


def test_custom_ops_pass_opcheck(device):
    # torch's own check of schema, autograd registration, fake tensors (meta device) and the
    # AOT-dispatch path torch.compile takes; each op runs for real against its fake.
    attention_mod, mask_mod = sys.modules["kernels.attention"], sys.modules["kernels.mask_decoder"]
    q, k, v = (torch.randn(1, 2, 20, 16, device=device, requires_grad=True) for _ in range(3))
    torch.library.opcheck(attention_mod._attention_fwd_op, (q, k, v, 0.25))
    patches = torch.randn(1, 20, 32, device=device, requires_grad=True)
    classes = torch.randn(1, 7, 32, device=device, requires_grad=True)
    w = torch.ones(7, device=device, requires_grad=True)
    b = torch.zeros(7, device=device, requires_grad=True)
    torch.library.opcheck(mask_mod._mask_fwd_op, (patches, classes, w, b, 1e-5))
