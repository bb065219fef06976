"""Every random stream a training process draws from, captured and restored, so a resumed run repeats the
uninterrupted one exactly: torch (CPU and the current GPU), NumPy, Python's `random`, and named generators such as
the Partial FC class sampler. States hold only tensors, numbers and tuples, so checkpoints load with
`weights_only=True`.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def capture(device: torch.device, generators: dict[str, torch.Generator]) -> dict:
    keys, pos, has_gauss, gauss = np.random.get_state()[1:]
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos), "has_gauss": int(has_gauss),
                  "gauss": float(gauss)},
        "python": random.getstate(),
        "generators": {name: gen.get_state() for name, gen in generators.items()},
    }
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def restore(state: dict, device: torch.device, generators: dict[str, torch.Generator]) -> None:
    torch.set_rng_state(state["torch"])
    numpy = state["numpy"]
    np.random.set_state(("MT19937", numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"],
                         numpy["gauss"]))
    random.setstate(state["python"])
    for name, gen in generators.items():
        gen.set_state(state["generators"][name])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)
