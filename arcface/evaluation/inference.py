"""The networks the evaluation tools run: a backbone file loaded into its registry model, or an ONNX export.

Both are `nn.Module`s mapping float (B, 3, 112, 112) in [-1, 1] to (B, D) embeddings, so pair sets, IJB and
single images are embedded by one code path whichever the network is.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from arcface.errors import UserError, first_line
from arcface.models import create_backbone


def load_backbone(name: str, weights: str | Path, embedding_size: int = 512,
                  device: torch.device = torch.device("cpu")) -> nn.Module:
    """Backbone `name` with the weights of a `model.pt`, a reference model-zoo `backbone.pth` or a `checkpoint.pt`,
    in fp32 and eval mode on `device`."""
    model = create_backbone(name, weights=str(weights), embedding_size=embedding_size)
    return model.to(device).eval()


def _providers(device: torch.device) -> list[str]:
    import onnxruntime as ort

    wanted = ["CUDAExecutionProvider"] if device.type == "cuda" else []
    return [p for p in wanted if p in ort.get_available_providers()] + ["CPUExecutionProvider"]


class OnnxBackbone(nn.Module):
    """An ONNX embedding model run by onnxruntime behind the backbone interface (on CUDA when asked and available).

    The model takes one float input of (batch, 3, 112, 112) scaled as in training, and gives one (batch, D) output.
    """

    def __init__(self, path: str | Path, device: torch.device = torch.device("cpu")):
        super().__init__()
        import onnxruntime as ort

        path = Path(path)
        if not path.is_file():
            raise UserError(f"ONNX model {path} does not exist: check the path, or export one with "
                            f"tools/export_onnx.py")
        try:
            self.session = ort.InferenceSession(str(path), providers=_providers(device))
        except Exception as e:  # onnxruntime raises its own exception types for a damaged or foreign file
            raise UserError(f"{path} cannot be loaded as an ONNX model ({first_line(e)}): export it again with "
                            f"tools/export_onnx.py") from None
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4 or len(outputs) != 1:
            raise UserError(f"{path} takes {len(inputs)} input(s) and gives {len(outputs)} output(s), not the one "
                            f"(batch, 3, 112, 112) image input and one embedding output of a face backbone")
        self.input_name = inputs[0].name
        self.path = path

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.session.run(None, {self.input_name: np.ascontiguousarray(x.detach().float().cpu().numpy())})[0]
        return torch.from_numpy(out).to(x.device)


def open_network(*, backbone: str | None, checkpoint: str | None, onnx: str | None, embedding_size: int = 512,
                 device: torch.device = torch.device("cpu")) -> nn.Module:
    """The network the command line names: `--onnx FILE`, or `--backbone NAME --checkpoint FILE`."""
    if (checkpoint is None) == (onnx is None):
        raise UserError("name exactly one network: --checkpoint FILE (with --backbone NAME) or --onnx FILE")
    if onnx is not None:
        return OnnxBackbone(onnx, device)
    if backbone is None:
        raise UserError(f"--checkpoint {checkpoint} needs --backbone NAME: the registry name it was trained as "
                        f"(r50, mbf, vit_t, a timm model name, ...)")
    return load_backbone(backbone, checkpoint, embedding_size, device)


def pick_device(name: str) -> torch.device:
    """`auto`: the GPU when there is one; `cpu`, `cuda`, `cuda:1` as given (a missing GPU is a UserError)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name!r} is not a device: use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asks for a GPU but none is visible: use --device cpu")
    return device
