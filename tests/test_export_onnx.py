"""ONNX export: onnxruntime matches PyTorch for each backbone family (timm included) at batch sizes 1 and 7, the
metadata states input and normalisation, the MFR checks fail where they must, a graph that differs from PyTorch is
never written, every weights format exports, and training exports at the end with trainer.export_onnx=true."""
from __future__ import annotations

import importlib.util
import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from conftest import REPO, TINY, run_train
from onnx import TensorProto, helper

from arcface.engine.training_state import save_backbone
from arcface.errors import UserError
from arcface.export import PARITY_LIMIT, cpu_session, export_onnx, face_batch, mfr_checks
from arcface.models import create_backbone

_spec = importlib.util.spec_from_file_location("export_tool", REPO / "tools" / "export_onnx.py")
export_tool = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(export_tool)


def _trained_looking(name: str, **kwargs) -> torch.nn.Module:
    """A backbone whose BatchNorm statistics come from face-like images, so its outputs have the scale of a
    trained network's (an untrained one's reach 1e7 or 1e-6, where an absolute tolerance says nothing)."""
    torch.manual_seed(0)
    model = create_backbone(name, embedding_size=64, **kwargs)
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            module.momentum = None  # a plain average over the calibration batches
    model.train()
    with torch.no_grad():
        model(face_batch(4))
    return model.eval()


@pytest.mark.parametrize("name", ["r18", "mbf", "vit_t", "test_convnext"])
def test_onnxruntime_matches_pytorch_at_any_batch_size(name, tmp_path):
    model = _trained_looking(name)
    path = tmp_path / f"{name}.onnx"
    report = export_onnx(model, path, backbone=name, mfr=False)  # the MFR checks are tested below
    assert max(report.parity.values()) <= PARITY_LIMIT
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for batch in (1, 7):
        x = face_batch(batch)
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {"input": x.numpy()})[0]
        assert got.shape == (batch, 64)
        assert np.abs(got - expected).max() <= PARITY_LIMIT * max(1.0, np.abs(expected).max())
    props = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert props["input_name"] == "input" and props["backbone"] == name
    assert props["normalization"] == "(pixel - 127.5) / 127.5, pixels 0..255"


def _graph_bytes(*, batch, outputs: int, weight_type, nan: bool) -> bytes:
    """A stand-in model: mean over the image (optionally through sqrt of a negative: NaN), times a weight."""
    x = helper.make_tensor_value_info("input", TensorProto.FLOAT, [batch, 3, 112, 112])
    weight = helper.make_tensor("w", weight_type, [1], [1.0])
    nodes = [helper.make_node("ReduceMean", ["input"], ["m"], axes=[2, 3], keepdims=0),
             helper.make_node("Cast", ["w"], ["wf"], to=TensorProto.FLOAT),
             helper.make_node("Mul", ["m", "wf"], ["y"])]
    if nan:
        nodes += [helper.make_node("Abs", ["y"], ["a"]), helper.make_node("Neg", ["a"], ["n"]),
                  helper.make_node("Constant", [], ["one"], value=helper.make_tensor("c", TensorProto.FLOAT, [1],
                                                                                       [1.0])),
                  helper.make_node("Sub", ["n", "one"], ["s"]), helper.make_node("Sqrt", ["s"], ["out0"])]
    else:
        nodes.append(helper.make_node("Identity", ["y"], ["out0"]))
    outs = [helper.make_tensor_value_info(f"out{i}", TensorProto.FLOAT, [batch, 3]) for i in range(outputs)]
    nodes += [helper.make_node("Identity", ["out0"], [f"out{i}"]) for i in range(1, outputs)]
    graph = helper.make_graph(nodes, "stand_in", [x], outs, initializer=[weight])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]).SerializeToString()


def _verdicts(data: bytes) -> dict[str, bool | None]:
    return {check.name: check.ok for check in mfr_checks(data, cpu_session(data), latency_runs=1)}


def test_mfr_checks_fail_where_they_must():
    good = _verdicts(_graph_bytes(batch="batch", outputs=1, weight_type=TensorProto.FLOAT, nan=False))
    assert all(ok is not False for ok in good.values()) and good["CPU latency"] is None
    bad = _verdicts(_graph_bytes(batch=1, outputs=2, weight_type=TensorProto.FLOAT16, nan=False))
    assert not bad["input"] and not bad["output"] and not bad["initialisers"] and not bad["batch of 32"]
    assert not _verdicts(_graph_bytes(batch="batch", outputs=1, weight_type=TensorProto.FLOAT, nan=True))["batch of 32"]


class _BakedConstant(torch.nn.Module):
    """Turns a value computed from the input into a Python float: tracing keeps the traced input's value."""

    def forward(self, x):
        return x.mean(dim=(2, 3)) + float(x.sum())


def test_a_graph_that_differs_from_pytorch_is_not_written(tmp_path):
    path = tmp_path / "baked.onnx"
    with pytest.raises(UserError, match="differs from PyTorch"):
        export_onnx(_BakedConstant(), path, backbone="baked", latency_runs=1)
    assert not path.exists()


def test_model_pt_and_zoo_backbone_pth_export_alike(tmp_path, capsys):
    model = _trained_looking("r_tiny")
    save_backbone(model, tmp_path / "model.pt")
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, tmp_path / "backbone.pth")  # DDP names
    outputs = []
    for weights in ("model.pt", "backbone.pth"):
        out = tmp_path / f"{weights}.onnx"
        assert export_tool.main([str(tmp_path / weights), "--backbone", "r_tiny", "--embedding-size", "64",
                                 "--output", str(out), "--latency-runs", "1"]) == 0
        session = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
        outputs.append(session.run(None, {"input": face_batch(2).numpy()})[0])
    np.testing.assert_array_equal(outputs[0], outputs[1])
    assert "MFR submission checks" in capsys.readouterr().out
    assert export_tool.main([str(tmp_path / "model.pt"), "--backbone", "r18", "--output",
                             str(tmp_path / "x.onnx")]) == 2
    assert "does not fit backbone 'r18'" in capsys.readouterr().err
    assert export_tool.main([str(tmp_path / "model.pt"), "--backbone", "r_tiny", "--embedding-size", "64",
                             "--output", str(tmp_path / "y.onnx"), "--latency-runs", "0"]) == 2
    assert "--latency-runs 0 must be at least 1" in capsys.readouterr().err and not (tmp_path / "y.onnx").exists()


def test_training_exports_at_the_end_and_checkpoint_pt_exports(tmp_path):
    done = run_train([*TINY, "tracking=none", "trainer.verify_at_start=false", "trainer.verify_at_end=false",
                      "trainer.export_onnx=true"], tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    run = tmp_path / "run"
    report = json.loads((run / "onnx" / "export_report.json").read_text())
    assert report["passed"] and report["backbone"] == "r_tiny" and report["embedding_size"] == 64
    trained = ort.InferenceSession(str(run / "onnx" / "model.onnx"), providers=["CPUExecutionProvider"])
    assert export_tool.main([str(run / "checkpoint.pt"), "--backbone", "r_tiny", "--embedding-size", "64",
                             "--output", str(tmp_path / "from_checkpoint.onnx"), "--latency-runs", "1"]) == 0
    again = ort.InferenceSession(str(tmp_path / "from_checkpoint.onnx"), providers=["CPUExecutionProvider"])
    x = face_batch(3).numpy()
    np.testing.assert_allclose(again.run(None, {"input": x})[0], trained.run(None, {"input": x})[0], atol=1e-6)
