"""kernels.profile: SPEC parsing, zoo shapes, FLOP/byte counts, the CSV, and `segrepro kernels
profile` end to end (its CSV and its MLflow run through harness.tracking)."""

import argparse
import csv
import json

import pytest
import torch
from kernel_helpers import no_cuda_only, requires_cuda

from harness import cli, contract
from kernels import profile
from kernels.profile import AttnShape, MaskShape, ModelDims, ProfileError, SpecError, parse_spec, zoo_shapes

ZOO = [
    ModelDims("Seg-T-Mask/16", 192, 3, 16, 1, 150, "mask", 3),
    ModelDims("Seg-B-Mask/16", 768, 12, 16, 1, 150, "mask", 12),
    ModelDims("Seg-B+-Mask/16", 768, 12, 16, 2, 150, "mask", 12),
    ModelDims("Seg-B/8", 768, 12, 8, 1, 150, "linear", 12),
    ModelDims("Seg-L-Mask/16", 1024, 16, 16, 1, 150, "mask", 16),
]


def _args(*argv):
    parser = argparse.ArgumentParser()
    profile.add_arguments(parser)
    return parser.parse_args(list(argv))


def test_parse_spec_round_trips_and_drops_duplicates():
    spec = "attn:B=8,H=12,N=1025,D=64; mask:B=8,N=1024,C=150,D=768;attn:b=8,h=12,n=1025,d=64"
    shapes = parse_spec(spec)
    assert shapes == [AttnShape(8, 12, 1025, 64), MaskShape(8, 1024, 150, 768)]
    assert parse_spec(";".join(s.label for s in shapes)) == shapes


@pytest.mark.parametrize(
    "spec,token,reason",
    [
        ("", "", "empty shape spec"),
        ("attn B=1,H=1,N=8,D=32", "attn B=1,H=1,N=8,D=32", "expected attn:"),
        ("conv:B=1,H=1,N=8,D=32", "conv:B=1,H=1,N=8,D=32", "expected attn:"),
        ("attn:B=1,H=1,N=8", "attn:B=1,H=1,N=8", "missing D"),
        ("attn:B=1,H=1,N=8,D=32,C=4", "attn:B=1,H=1,N=8,D=32,C=4", "'C=4' is not one of"),
        ("mask:B=1,N=8,C=x,D=32", "mask:B=1,N=8,C=x,D=32", "C='x' is not an integer"),
        ("attn:B=0,H=1,N=8,D=32", "attn:B=0,H=1,N=8,D=32", "B=0 must be >= 1"),
        ("attn:B=1,B=2,H=1,N=8,D=32", "attn:B=1,B=2,H=1,N=8,D=32", "B given twice"),
        ("attn:B=1,H=1,N=8,D=256", "attn:B=1,H=1,N=8,D=256", "limit of 128"),
        ("attn:B=1,H=1,N=8,D=32;mask:B=1", "mask:B=1", "missing N,C,D"),
    ],
)
def test_parse_spec_errors_name_the_bad_token(spec, token, reason):
    with pytest.raises(SpecError) as info:
        parse_spec(spec)
    assert reason in str(info.value)
    assert repr(token) in str(info.value) or spec == ""


def test_bad_spec_exits_2_and_names_the_token(capsys):
    assert cli.main(["kernels", "profile", "--shapes", "attn:B=1,H=1,N=8,D=32;attn:B=1,H=x"]) == 2
    (err,) = capsys.readouterr().err.splitlines()
    assert "--shapes" in err and "'attn:B=1,H=x'" in err


def test_bad_zoo_is_refused():
    with pytest.raises(ProfileError, match="empty"):
        profile.measure(_args(), [])
    with pytest.raises(ProfileError, match="'odd'"):
        profile.measure(_args(), [ModelDims("odd", 100, 3, 16, 1, 150, "mask", 3)])


def test_zoo_shapes():
    shapes = zoo_shapes(ZOO, batches=(1, 32))
    # ViT-B/16 at 512: 32x32 patches + cls; its mask decoder adds the 150 class tokens.
    assert "Seg-B-Mask/16 encoder@512" in shapes[AttnShape(32, 12, 1025, 64)]
    assert "Seg-B-Mask/16 decoder@512" in shapes[AttnShape(32, 12, 1174, 64)]
    assert shapes[MaskShape(1, 1024, 150, 768)] == [
        "Seg-B-Mask/16 mask step@512", "Seg-B+-Mask/16 mask step@512"]
    # Distilled DeiT carries cls + dist; L at 640 has 40x40 patches.
    assert AttnShape(1, 12, 1026, 64) in shapes
    assert AttnShape(1, 16, 1601, 64) in shapes and MaskShape(1, 1600, 150, 1024) in shapes
    # Linear B/8: encoder only, (512/8)^2 + 1 tokens.
    assert shapes[AttnShape(1, 12, 4097, 64)] == ["Seg-B/8 encoder@512"]
    assert not any("Seg-B/8 decoder" in s or "Seg-B/8 mask" in s
                   for sites in shapes.values() for s in sites)
    assert all(s.D == 64 for s in shapes if isinstance(s, AttnShape))


def test_flop_and_byte_counts():
    s = AttnShape(2, 3, 10, 64)
    assert profile.attention_flops(s, "fwd") == 4 * 2 * 3 * 10 * 10 * 64
    assert profile.attention_flops(s, "bwd") == 2.5 * 4 * 2 * 3 * 10 * 10 * 64
    assert profile.interface_bytes(s, "fwd", 2) == 4 * 2 * 3 * 10 * 64 * 2
    assert profile.interface_bytes(s, "bwd", 2) == 8 * 2 * 3 * 10 * 64 * 2
    m = MaskShape(2, 10, 5, 8)
    assert profile.mask_flops(m, "fwd") == 2 * 2 * 10 * 5 * 8
    assert profile.mask_flops(m, "bwd") == 4 * 2 * 10 * 5 * 8
    assert profile.interface_bytes(m, "fwd", 4) == (160 + 80 + 100) * 4 + 2 * 5 * 4


def test_csv_text():
    assert profile.csv_text([{"a": 1, "b": 2.5}, {"a": "x,y", "b": None}]) == 'a,b\n1,2.5\n"x,y",\n'
    with pytest.raises(ValueError):  # a row with a field the header lacks
        profile.csv_text([{"a": 1}, {"zzz": 2}])


@no_cuda_only
def test_no_gpu_run_checks_and_writes_csv(tmp_path, capsys):
    spec = "attn:B=1,H=2,N=40,D=32;mask:B=1,N=40,C=150,D=64"
    assert cli.main(["kernels", "profile", "--shapes", spec, "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert sum("No CUDA GPU" in line for line in out) == 1 and "No CUDA GPU" in out[0]
    with open(tmp_path / "kernels_check.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    got = {(r["shape"], r["dtype"], r["output"]) for r in rows}
    want = {(s, d, o) for d in ("fp32", "fp16")
            for s, outs in (("attn:B=1,H=2,N=40,D=32", ("out", "dq", "dk", "dv")),
                            ("mask:B=1,N=40,C=150,D=64",
                             ("out", "d_patches", "d_classes", "d_weight", "d_bias")))
            for o in outs}
    assert got == want
    assert all(r["passed"] == "True" and float(r["max_abs_err"]) < float(r["limit"]) for r in rows)


@no_cuda_only
def test_no_gpu_run_returns_1_when_a_check_fails(capsys, monkeypatch):
    # A zero tolerance makes every inexact output fail, which must reach the exit status.
    monkeypatch.setitem(profile.CHECK_TOLERANCE, "fp32", 0.0)
    assert cli.main(["kernels", "profile", "--shapes", "attn:B=1,H=1,N=20,D=16", "--dtype", "fp32"]) == 1
    assert "FAIL" in capsys.readouterr().out


@no_cuda_only
def test_no_gpu_run_json_and_mlflow(tmp_path, capsys):
    from mlflow import MlflowClient

    uri = contract.default_tracking_uri(tmp_path)
    assert cli.main(["kernels", "profile", "--shapes", "attn:B=1,H=1,N=20,D=16", "--dtype", "fp16", "--json",
                     "--tracking-uri", uri]) == 0
    captured = capsys.readouterr()
    assert "No CUDA GPU" in captured.err  # stdout stays pure JSON
    result = json.loads(captured.out)
    assert result["kind"] == "check" and result["passed"] is True
    assert result["device"]["device_type"] == "cpu"
    assert {r["output"] for r in result["rows"]} == {"out", "dq", "dk", "dv"}

    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(contract.EXPERIMENT).experiment_id])
    assert run.info.status == "FINISHED"
    assert run.data.params["device_type"] == "cpu" and run.data.params[contract.KERNELS_KIND_PARAM] == "check"
    assert run.data.tags[contract.KIND] == contract.KIND_KERNELS_CHECK
    assert run.data.metrics[contract.CHECKS_FAILED] == 0
    assert run.data.metrics["attn_B_1_H_1_N_20_D_16/fp16/dq/max_abs_err"] == pytest.approx(
        next(r["max_abs_err"] for r in result["rows"] if r["output"] == "dq"))
    artifact = contract.KERNELS_ARTIFACT[contract.KIND_KERNELS_CHECK]
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == [artifact]
    with open(client.download_artifacts(run.info.run_id, artifact, str(tmp_path)), newline="") as f:
        logged = list(csv.DictReader(f))
    assert [(r["shape"], r["output"]) for r in logged] == [(r["shape"], r["output"]) for r in result["rows"]]


@no_cuda_only
def test_a_damaged_store_is_refused_before_the_check_runs(tmp_path, capsys):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"not a database" * 100)
    assert cli.main(["kernels", "profile", "--shapes", "attn:B=1,H=1,N=20,D=16",
                     "--tracking-uri", contract.default_tracking_uri(tmp_path)]) == 2
    captured = capsys.readouterr()
    (err,) = captured.err.splitlines()
    assert str(db) in err and "not a readable MLflow store" in err
    assert "No CUDA GPU" not in captured.out + captured.err  # nothing measured


@pytest.mark.gpu
@requires_cuda
def test_gpu_profile_times_every_impl(tmp_path):
    spec = "attn:B=2,H=4,N=257,D=64;mask:B=2,N=256,C=150,D=384"
    assert cli.main(["kernels", "profile", "--shapes", spec, "--out", str(tmp_path)]) == 0
    with open(tmp_path / "kernels_profile.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    timed = [r for r in rows if r["status"] == "ok"]
    assert {(r["impl"], r["direction"]) for r in timed if r["kernel"] == "mask"} == {
        ("triton", "fwd"), ("triton", "bwd"), ("reference", "fwd"), ("reference", "bwd")}
    assert {"triton", "reference", "sdpa_math"} <= {r["impl"] for r in timed if r["kernel"] == "attn"}
    assert all(float(r["ms"]) > 0 and float(r["tflops"]) > 0 for r in timed)
    assert {r["stat"] for r in timed} == {"median", "p20", "p80"}
    assert torch.cuda.get_device_name(0) in {r["device"] for r in rows}
