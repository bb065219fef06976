"""The open-set task of the accuracy benchmark: synthetic identities as vectors, a small network, the project's head.

An identity is a point z in a latent space. Each sample of it is z moved by intra-class variation, entangled with
a nuisance vector (the analogue of pose and lighting) by a fixed random nonlinear "renderer", plus sensor noise.
Held-out identities come from the same world (renderer), drawn from another random stream, so none is trained on.
The network (an MLP with BatchNorm, shaped like a face backbone's embedding head) has to undo the renderer and
discount the nuisance; how well its embeddings separate unseen identities is what the classifier head taught it.

The head, the margin, the optimizer and the LR schedule are the project's own, built from conf/ exactly as
`arcface-train` builds them (`arcface.heads.PartialFC`, the margins, `arcface.engine.optim.build_optimizer`,
the scheduler), so a variant is a list of the same overrides a user would type (`pfc.rate=0.1 compat=reference`).
"""
from __future__ import annotations

import dataclasses
import math
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from arcface.compat import check_compat
from arcface.config_checks import check_config
from arcface.data.synthetic import _generator
from arcface.engine.optim import build_optimizer
from arcface.evaluation.verification import verification_scores
from arcface.train import CONF_DIR


@dataclass(frozen=True)
class World:
    """The generative model of samples; its `seed` fixes the renderer and every identity and sample."""

    latent: int = 32           # dimensions of identity
    nuisance: int = 16         # dimensions of nuisance (pose, lighting): same distribution for every identity
    hidden: int = 128          # the renderer's hidden width
    observed: int = 64         # dimensions of a sample
    variation: float = 0.6     # intra-class spread in latent units (identities spread with std 1)
    nuisance_scale: float = 1.0
    noise: float = 0.3         # sensor noise added to the rendered sample
    seed: int = 0


@dataclass(frozen=True)
class Setup:
    """Sizes of one benchmark run; `quick()` is the --quick one."""

    train_identities: int = 10_000
    samples_per_identity: int = 8
    held_out_identities: int = 2_000
    held_out_pairs: int = 6_000
    embedding_size: int = 128
    width: int = 256
    batch_size: int = 256
    epochs: float = 2.0
    probes: int = 4            # held-out verifications over training (the last one is the final result)
    world: World = World()

    @property
    def steps(self) -> int:
        return max(1, round(self.epochs * self.train_identities * self.samples_per_identity / self.batch_size))

    @classmethod
    def quick(cls) -> "Setup":
        return cls(train_identities=2_000, held_out_identities=1_000, held_out_pairs=3_000, probes=2)

    @classmethod
    def tiny(cls) -> "Setup":
        """Seconds: for checking the whole pipeline, not for its numbers."""
        return cls(train_identities=64, samples_per_identity=4, held_out_identities=20, held_out_pairs=40,
                   embedding_size=16, width=32, batch_size=32, epochs=1.0, probes=2)


class Renderer:
    """The fixed nonlinear map (identity point + variation, nuisance) -> observed sample."""

    def __init__(self, world: World):
        self.world = world
        gen = _generator(world.seed, 0)
        inputs = world.latent + world.nuisance
        self.w1 = torch.randn(inputs, world.hidden, generator=gen) * math.sqrt(2.0 / inputs)
        self.b1 = torch.randn(world.hidden, generator=gen) * 0.5
        self.w2 = torch.randn(world.hidden, world.observed, generator=gen) / math.sqrt(world.hidden)

    def identities(self, count: int, stream: int) -> torch.Tensor:
        """`count` identity points; stream 1 = training identities, stream 2 = held-out ones."""
        return torch.randn(count, self.world.latent, generator=_generator(self.world.seed, stream))

    def render(self, points: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        """One sample of each identity point (rows of `points`)."""
        w = self.world
        varied = points + w.variation * torch.randn(points.shape, generator=gen)
        nuisance = w.nuisance_scale * torch.randn(points.shape[0], w.nuisance, generator=gen)
        hidden = torch.tanh(torch.cat([varied, nuisance], dim=1) @ self.w1 + self.b1)
        return hidden @ self.w2 + w.noise * torch.randn(points.shape[0], w.observed, generator=gen)


@dataclass
class Data:
    train_x: torch.Tensor       # (identities * samples, observed)
    train_y: torch.Tensor       # (identities * samples,) int64
    pairs_x: torch.Tensor       # (2 * pairs, observed): rows 2i and 2i+1 form pair i
    issame: np.ndarray          # (pairs,) bool


def make_data(setup: Setup) -> Data:
    """The training set (a fixed number of samples per identity, like a face dataset) and the held-out pairs."""
    renderer = Renderer(setup.world)
    train_points = renderer.identities(setup.train_identities, stream=1)
    labels = torch.arange(setup.train_identities).repeat_interleave(setup.samples_per_identity)
    train_x = renderer.render(train_points[labels], _generator(setup.world.seed, 3))
    held = renderer.identities(setup.held_out_identities, stream=2)
    gen = _generator(setup.world.seed, 4)
    n = setup.held_out_pairs
    first = torch.randint(setup.held_out_identities, (n,), generator=gen)
    # Half the pairs genuine (the same identity twice), half impostor (a different identity).
    issame = torch.arange(n) % 2 == 0
    other = (first + 1 + torch.randint(setup.held_out_identities - 1, (n,), generator=gen)) % setup.held_out_identities
    second = torch.where(issame, first, other)
    pairs = held[torch.stack([first, second], dim=1).reshape(-1)]
    return Data(train_x, labels, renderer.render(pairs, gen), issame.numpy())


def make_backbone(setup: Setup) -> nn.Module:
    """Linear-BN-PReLU twice, then Linear -> BatchNorm1d: a face backbone's embedding head on a vector input."""
    w, d = setup.width, setup.embedding_size
    return nn.Sequential(
        nn.Linear(setup.world.observed, w, bias=False), nn.BatchNorm1d(w), nn.PReLU(w),
        nn.Linear(w, w, bias=False), nn.BatchNorm1d(w), nn.PReLU(w),
        nn.Linear(w, d, bias=False), nn.BatchNorm1d(d),
    )


def compose_train(overrides: list[str]):
    """conf/train.yaml with `overrides`, untracked (the benchmark tracks its runs itself)."""
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose(config_name="train", overrides=["tracking=none", *overrides])


def compose_variant(overrides: list[str], setup: Setup):
    """conf/train.yaml with the variant's overrides and this task's sizes, checked as `arcface-train` checks it."""
    cfg = compose_train([f"embedding_size={setup.embedding_size}", f"dataset.num_classes={setup.train_identities}",
                         f"trainer.batch_size={setup.batch_size}", *overrides])
    check_config(cfg)
    check_compat(cfg)
    return cfg


@dataclass
class Verification:
    step: int
    accuracy: float
    accuracy_std: float
    tar_at_far: float          # TAR at FAR = 1e-3, 10-fold thresholds


@torch.no_grad()
def verify(backbone: nn.Module, data: Data, step: int) -> Verification:
    was_training = backbone.training
    backbone.eval()
    embeddings = F.normalize(backbone(data.pairs_x)).numpy()
    backbone.train(was_training)
    accuracy, std, tar = verification_scores(embeddings, data.issame, far_target=1e-3)
    return Verification(step, accuracy, std, tar)


def train_variant(overrides: list[str] | None, setup: Setup, data: Data, seed: int) -> dict:
    """Train (or, for `overrides=None`, only initialise) one network with the head the overrides compose; returns
    its held-out verifications over training, the final one last, and the training losses."""
    torch.manual_seed(seed)
    backbone = make_backbone(setup)
    if overrides is None:
        return {"curve": [dataclasses.asdict(verify(backbone, data, 0))], "losses": [], "train_s": 0.0}
    cfg = compose_variant(overrides, setup)
    head = instantiate(cfg.pfc, margin=instantiate(cfg.margin))
    optimizer = build_optimizer(instantiate(cfg.optimizer), backbone, head)
    for group in optimizer.param_groups:
        group.setdefault("initial_lr", group["lr"])
    schedule = instantiate(cfg.scheduler, warmup_steps=0, total_steps=setup.steps)
    order_gen = torch.Generator().manual_seed(seed)
    probe_at = {round(setup.steps * (i + 1) / setup.probes) for i in range(setup.probes)}
    curve, losses, window = [dataclasses.asdict(verify(backbone, data, 0))], [], []
    backbone.train()
    head.train()
    start, step, order = time.perf_counter(), 0, torch.empty(0, dtype=torch.long)
    while step < setup.steps:
        if order.numel() < setup.batch_size:  # a new epoch: every sample once, in a fresh order
            order = torch.randperm(len(data.train_y), generator=order_gen)
        batch, order = order[:setup.batch_size], order[setup.batch_size:]
        schedule.apply(optimizer, step)
        loss = head(backbone(data.train_x[batch]), data.train_y[batch])
        loss.backward()
        if cfg.trainer.grad_clip is not None:
            nn.utils.clip_grad_norm_(backbone.parameters(), cfg.trainer.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        window.append(float(loss.detach()))
        if step in probe_at:
            losses.append({"step": step, "loss": float(np.mean(window))})
            window = []
            curve.append(dataclasses.asdict(verify(backbone, data, step)))
    return {"curve": curve, "losses": losses, "train_s": time.perf_counter() - start}
