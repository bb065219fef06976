"""ONNX export of a backbone: one self-contained file with a free batch dimension, checked against PyTorch with
onnxruntime and against the MFR challenge's submission rules.

The model takes `input`: float32 (batch, 3, 112, 112), RGB, pixels scaled as in training ((p - 127.5) / 127.5),
and gives `embedding`: float32 (batch, D), not L2-normalised. Both facts are also in the file's metadata.
"""
from __future__ import annotations

import copy
import functools
import io
import json
import logging
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from arcface.data.synthetic import SyntheticIdentities
from arcface.data.transforms import PIXEL_MEAN, PIXEL_SCALE, prepare_batch
from arcface.errors import UserError, first_line
from arcface.fileio import atomic_write, write_text_atomically
from arcface.models.base import Backbone

log = logging.getLogger(__name__)

# 17: the first opset with LayerNormalization as one op (ViTs export without decomposing it); onnxruntime runs it
# from 1.12 on, and every later onnxruntime runs older opsets.
OPSET = 17
OPSETS = range(11, 21)  # what the TorchScript exporter writes (to 20) with every op the backbones use (from 11)
INPUT_NAME, OUTPUT_NAME = "input", "embedding"
SIZE = 112
PARITY_LIMIT = 1e-4
MFR_MAX_BYTES = 1_000_000_000
MFR_MAX_DIM = 1024  # the glint track; the ms1m track allows 512
PROTOBUF_MAX_BYTES = 2 ** 31 - 1  # one ONNX file (weights inside) cannot be larger
_FACES = 8
# Initialiser types of 32 bits or more; anything narrower (fp16, bf16, int8, ...) is refused by MFR.
_WIDE_TYPES = ("FLOAT", "DOUBLE", "INT32", "UINT32", "INT64", "UINT64", "COMPLEX64", "COMPLEX128")


@dataclass
class Check:
    name: str
    ok: bool | None  # None: reported only (CPU latency depends on the machine)
    detail: str


@dataclass
class ExportReport:
    path: str
    backbone: str
    embedding_size: int
    megabytes: float
    opset: int
    parity: dict[str, float]  # input kind -> max |onnx - torch| relative to the output scale (see parity)
    checks: list[Check] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return all(check.ok is not False for check in self.checks)

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "passed": self.passed}, indent=2)

    def text(self) -> str:
        lines = [f"exported {self.backbone} ({self.embedding_size}-d) to {self.path}: {self.megabytes:.1f} MB, "
                 f"opset {self.opset}",
                 "parity with PyTorch (max |difference| / max(1, |output|), fp32): " + ", ".join(
                     f"{kind} {diff:.2e}" for kind, diff in self.parity.items()) + f" (limit {PARITY_LIMIT:g})",
                 "MFR submission checks:" if self.checks else "MFR submission checks: not run"]
        width = max(len(check.name) for check in self.checks) if self.checks else 0
        marks = {True: "ok", False: "FAILED", None: "info"}
        lines += [f"  {check.name:<{width}}  {marks[check.ok]:<6}  {check.detail}" for check in self.checks]
        return "\n".join(lines)


def fp32_copy(model: nn.Module) -> nn.Module:
    """An fp32 CPU copy of `model` in eval mode, whatever precision and device it trains in."""
    model = copy.deepcopy(model).float().cpu().to(memory_format=torch.contiguous_format).eval()
    for module in model.modules():
        if isinstance(module, Backbone):  # no autocast region in the exported graph
            module.trunk_dtype = torch.float32
            module.channels_last = False
    return model


@functools.lru_cache(maxsize=1)
def _faces() -> torch.Tensor:
    faces = SyntheticIdentities(num_classes=_FACES, images_per_class=1, seed=7)
    return torch.stack([faces.render(i, 0) for i in range(_FACES)])


def face_batch(count: int) -> torch.Tensor:
    """Real-looking input: `count` synthetic face-like images (a pool of _FACES, repeated), scaled as in training."""
    return prepare_batch(_faces()[torch.arange(count) % _FACES], torch.device("cpu"), flip=False)


def _random_batch(count: int) -> torch.Tensor:
    return torch.rand(count, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(0)) * 2 - 1


def _onnx_bytes(model: nn.Module, opset: int, backbone: str) -> bytes:
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        # The TorchScript exporter announces its deprecation and flags Python-side shape arithmetic; the parity
        # check on batches of other sizes than the traced one is what proves the graph right.
        warnings.simplefilter("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*legacy TorchScript-based ONNX export.*")
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        try:
            torch.onnx.export(model, (_random_batch(1),), buffer, input_names=[INPUT_NAME],
                              output_names=[OUTPUT_NAME], opset_version=opset, do_constant_folding=True,
                              dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, dynamo=False)
        except Exception as e:  # the exporter raises many types (an op without ONNX form, an opset it lacks, ...)
            raise UserError(f"backbone {backbone} cannot be exported to ONNX opset {opset} ({first_line(e)}): "
                            f"try another --opset") from None
    return buffer.getvalue()


def _with_metadata(data: bytes, backbone: str) -> tuple[bytes, int]:
    """The model with its input, normalisation and output stated in its metadata; and its embedding size."""
    import onnx

    proto = onnx.load_from_string(data)
    embedding_size = proto.graph.output[0].type.tensor_type.shape.dim[-1].dim_value
    onnx.helper.set_model_props(proto, {
        "input_name": INPUT_NAME,
        "input_layout": f"NCHW float32, RGB, {SIZE}x{SIZE} aligned face crops, free batch dimension",
        "normalization": f"(pixel - {PIXEL_MEAN}) / {PIXEL_SCALE}, pixels 0..255",
        "output_name": OUTPUT_NAME,
        "output": f"float32 (batch, {embedding_size}) embedding, not L2-normalised",
        "backbone": backbone,
        "producer": "arcface",
    })
    return proto.SerializeToString(), embedding_size


def cpu_session(model_bytes: bytes):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3  # errors only
    return ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])


def parity(model: nn.Module, session) -> dict[str, float]:
    """Max |onnx - torch| over a random and a face-like batch, each of another size than the traced batch of 1
    (so a batch size baked into the graph fails here). Measured relative to the largest output where that exceeds 1:
    an untrained network's outputs reach 1e7, where fp32 itself resolves only about 1."""
    diffs = {}
    for kind, x in (("random input", _random_batch(2)), ("face images", face_batch(3))):
        with torch.no_grad():
            expected = model(x).numpy()
        got = session.run(None, {INPUT_NAME: x.numpy()})[0]
        if got.shape != expected.shape:
            raise UserError(f"the ONNX export gives {got.shape} for a batch of {len(x)} where PyTorch gives "
                            f"{expected.shape}: the graph does not follow the batch size, so it was not written")
        scale = max(1.0, float(np.abs(expected).max()))
        diffs[kind] = float(np.abs(got - expected).max()) / scale
    return diffs


def mfr_checks(model_bytes: bytes, session, latency_runs: int = 20) -> list[Check]:
    """The MFR challenge's rules for a submitted model, each reported with what was found."""
    import onnx

    graph = onnx.load_from_string(model_bytes).graph
    weights = {init.name for init in graph.initializer}
    inputs = [i for i in graph.input if i.name not in weights]
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim] for i in inputs]
    shape_ok = len(inputs) == 1 and len(dims[0]) == 4 and dims[0][1:] == [3, SIZE, SIZE] \
        and isinstance(dims[0][0], str)
    shown = "; ".join(f"{i.name} {tuple(d)}" for i, d in zip(inputs, dims))
    wanted = "" if shape_ok else f" (wanted one (batch, 3, {SIZE}, {SIZE}) with a free batch dimension)"
    checks = [Check("input", shape_ok, f"{len(inputs)} input(s): {shown}{wanted}")]
    outputs = session.get_outputs()
    dim = outputs[0].shape[-1] if outputs else None
    checks.append(Check("output", len(outputs) == 1, f"{len(outputs)} output(s): "
                        + "; ".join(f"{o.name} {tuple(o.shape)}" for o in outputs)))
    checks.append(Check("embedding size", isinstance(dim, int) and dim <= MFR_MAX_DIM,
                        f"{dim} (glint track <= {MFR_MAX_DIM}, ms1m track <= 512)"))
    size = len(model_bytes)
    checks.append(Check("file size", size <= MFR_MAX_BYTES, f"{size / 1e6:.1f} MB (limit {MFR_MAX_BYTES / 1e9:g} GB)"))
    narrow = sorted({onnx.TensorProto.DataType.Name(init.data_type) for init in graph.initializer
                     if onnx.TensorProto.DataType.Name(init.data_type) not in _WIDE_TYPES})
    checks.append(Check("initialisers", not narrow, "all 32-bit or wider" if not narrow else
                        f"narrower than 32 bits: {', '.join(narrow)}"))
    name = session.get_inputs()[0].name
    try:
        out = session.run(None, {name: _random_batch(32).numpy()})[0]
    except Exception as e:  # onnxruntime's own error types: a fixed batch size, another input shape
        checks.append(Check("batch of 32", False, f"does not run ({first_line(e)})"))
        return checks
    finite = bool(np.isfinite(out).all())
    checks.append(Check("batch of 32", finite, "finite" if finite else
                        f"{int((~np.isfinite(out)).sum())} NaN/inf values in the output"))
    one = face_batch(1).numpy()
    for _ in range(2):  # warm-up: the first runs allocate
        session.run(None, {name: one})
    times = []
    for _ in range(latency_runs):
        start = time.perf_counter()
        session.run(None, {name: one})
        times.append(time.perf_counter() - start)
    checks.append(Check("CPU latency", None, f"median {statistics.median(times) * 1000:.1f} ms per image (batch 1, "
                        f"{latency_runs} runs on this machine; MFR's budget is 10-30 ms on theirs, by track)"))
    return checks


def export_onnx(model: nn.Module, path: str | Path, *, backbone: str, opset: int = OPSET, mfr: bool = True,
                latency_runs: int = 20) -> ExportReport:
    """Export `model` to `path` and check it. A graph that does not match PyTorch (beyond PARITY_LIMIT) is a
    UserError and nothing is written; a file that breaks an MFR rule is written, and the report says which
    (`mfr=False`: not checked)."""
    if opset not in OPSETS:
        raise UserError(f"--opset {opset} is outside {OPSETS.start}..{OPSETS.stop - 1}, the opsets the exporter "
                        f"writes: choose one of them (default {OPSET})")
    model = fp32_copy(model)
    weight_bytes = sum(t.numel() * 4 for t in model.state_dict().values())
    if weight_bytes > PROTOBUF_MAX_BYTES:
        raise UserError(f"backbone {backbone} holds {weight_bytes / 1e9:.2f} GB of fp32 weights, more than the 2 GB "
                        f"one self-contained ONNX file can hold: export a smaller backbone")
    data, embedding_size = _with_metadata(_onnx_bytes(model, opset, backbone), backbone)
    session = cpu_session(data)
    diffs = parity(model, session)
    worst = max(diffs, key=diffs.get)
    if diffs[worst] > PARITY_LIMIT:
        raise UserError(f"the ONNX export of {backbone} differs from PyTorch by {diffs[worst]:.2e} on {worst} (limit "
                        f"{PARITY_LIMIT:g}), so {path} was not written: try another --opset")
    with atomic_write(path) as f:
        f.write(data)
    return ExportReport(str(path), backbone, embedding_size, len(data) / 1e6, opset, diffs,
                        mfr_checks(data, session, latency_runs) if mfr else [])


def log_onnx_model(uri: str, run_id: str, path: str | Path, report: ExportReport) -> None:
    """The model into MLflow run `run_id` (`mlflow.onnx`), with the export report as a run artifact."""
    import mlflow.onnx
    import onnx

    from arcface.evaluation.run_log import active_run

    with active_run(uri, run_id):
        mlflow.onnx.log_model(onnx.load(str(path)), name="onnx_model")
        mlflow.log_text(report.to_json(), "onnx/export_report.json")


def export_after_training(backbone: nn.Module, backbone_name: str, output_dir: Path, tracker) -> None:
    """`trainer.export_onnx=true`: `<run dir>/onnx/model.onnx` and its report, logged as the run's `onnx/`
    artifacts. The weights are safe in model.pt already, so a failed export is logged, not raised."""
    folder = output_dir / "onnx"
    try:
        report = export_onnx(backbone, folder / "model.onnx", backbone=backbone_name)
    except Exception as e:  # the run succeeded; say how to retry instead of failing it
        log.error("ONNX export failed (%s: %s); retry with: python tools/export_onnx.py %s --backbone %s --output "
                  "%s", type(e).__name__, e, output_dir / "model.pt", backbone_name, folder / "model.onnx")
        return
    write_text_atomically(folder / "export_report.json", report.to_json())
    log.info("%s", report.text())
    if not report.passed:
        log.warning("the ONNX model breaks an MFR submission rule (see above); it still runs anywhere else")
    tracker.log_artifacts(folder, artifact_path="onnx")
