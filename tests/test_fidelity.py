"""`compat=reference` trains with arcface_torch's maths: a few steps reproduce the loss values its own code printed.

How the literals below were produced: arcface_torch at deepinsight/insightface commit
7fadd420 (recognition/arcface_torch: losses.py, partial_fc_v2.py, lr_scheduler.py, unmodified) was run on CPU from a
scratch directory with this project's Python (torch) and a script that
  - makes `Tensor.cuda` return the tensor itself (the reference moves tensors with `.cuda()`) and starts a 1-rank
    gloo process group,
  - builds `make_case()` from this file: the same images, labels and initial weights the tests below use,
  - builds CombinedMarginLoss(64, m1, m2, m3), PartialFC_V2(margin, EMBEDDING, CLASSES, sample_rate=1.0, fp16=False)
    with its centres copied from the case, and SGD over [{backbone params}, {pfc params}] with lr=LR, momentum 0.9,
    weight_decay WD and PolynomialLRWarmup(opt, warmup_iters=WARMUP_STEPS*ACC, total_iters=STEPS*ACC), as its
    train_v2.py does (which counts both in micro-batches),
  - runs train_v2.py's fp32 loop over the case's micro-batches: loss = pfc(backbone(img), labels); loss.backward();
    every ACC-th micro-batch clip_grad_norm_(backbone.parameters(), 5), opt.step(), opt.zero_grad(); then
    lr_scheduler.step() after every micro-batch; and printed each micro-batch's loss.item() with repr.
Images enter the reference as its transform leaves them, (x/255 - 0.5)/0.5. The backbone is a linear layer, the same
module in both runs: what is compared is the head, margin, optimizer, accumulation, clipping and schedule. Not
followed: train_v2.py wraps the backbone in DistributedDataParallel with fp16_compress_hook, which rounds backbone
gradients to fp16 before the all-reduce (a communication detail, docs/fidelity.md); the script leaves DDP out.
REFERENCE_LR was printed by the same script: the rate of each of 8 optimizer steps (get_last_lr()[0] before each
scheduler.step()) of PolynomialLRWarmup(SGD lr 1.0, warmup_iters=3, total_iters=8). The one edit to the reference's
files: lr_scheduler.py passes `verbose` to torch's LRScheduler, which torch 2.14 no longer accepts, so the scratch
copy drops that argument (it only controlled printing).

The mirror-symmetric images make the trainer's random horizontal flips change nothing, so no random number enters.
The case keeps every sample's target probability above 1e-30: the reference floors it there, so a sample past that
point would log a loss capped at 69.08 where this project logs the true one (the training is the same either way:
the reference's backward ignores the floor; docs/fidelity.md). Its centres start at N(0, 1) rather than the
reference's N(0, 0.01), which copies them in anyway: tiny centres take huge normalised gradients and saturate
samples within two steps.
"""
from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn as nn
from hydra.utils import instantiate

from arcface.compat import check_compat
from arcface.config_checks import check_config
from arcface.data import synthetic_pair_set
from arcface.engine.optim import build_optimizer
from arcface.engine.schedule import PolynomialWarmup
from arcface.engine.trainer import Trainer
from arcface.errors import UserError
from arcface.evaluation import evaluate
from arcface.train import trainer_options
from conftest import CPU, compose_config

CLASSES, EMBEDDING, SIDE = 10, 128, 4
BATCH, ACC, STEPS, WARMUP_STEPS = 4, 2, 3, 2
LR, WD = 0.1, 5e-4
TOLERANCE = 1e-5  # float32 throughout; the two codes order some operations differently

# Each micro-batch's loss as arcface_torch printed it (see the module docstring), per margin preset.
REFERENCE_LOSSES = {
    "arcface": [35.01988983154297, 36.21178436279297, 39.014137268066406, 40.63026428222656, 44.57330322265625,
                39.42967987060547],
    "cosface": [29.583419799804688, 31.047725677490234, 34.19276428222656, 35.4218864440918, 39.85987091064453,
                34.64359664916992],
}
REFERENCE_LR = [1.0, 0.3333333333333333, 0.6666666666666666, 1.0, 0.8, 0.6, 0.4, 0.19999999999999996]


def make_case() -> dict[str, torch.Tensor]:
    """Micro-batches of mirror-symmetric uint8 images with labels, and the initial backbone and centre weights."""
    g = torch.Generator().manual_seed(7)
    count = BATCH * ACC * STEPS
    half = torch.randint(0, 256, (count, 3, SIDE, SIDE // 2), generator=g, dtype=torch.uint8)
    return {
        "images": torch.cat([half, half.flip(3)], dim=3),
        "labels": torch.randint(0, CLASSES, (count,), generator=g),
        "weight": torch.randn(EMBEDDING, 3 * SIDE * SIDE, generator=g) * 0.05,
        "bias": torch.randn(EMBEDDING, generator=g) * 0.05,
        "centres": torch.randn(CLASSES, EMBEDDING, generator=g),
    }


def make_backbone(case: dict[str, torch.Tensor]) -> nn.Module:
    backbone = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIDE * SIDE, EMBEDDING))
    with torch.no_grad():
        backbone[1].weight.copy_(case["weight"])
        backbone[1].bias.copy_(case["bias"])
    return backbone


class _Batches:
    """The case's micro-batches in order, with the loader interface the trainer reads."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        self.images, self.labels, self.batch_size = images, labels, BATCH

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.start = start_batch

    def __len__(self) -> int:
        return len(self.labels) // BATCH

    def __iter__(self):
        for i in range(self.start, len(self)):
            yield self.images[i * BATCH:(i + 1) * BATCH], self.labels[i * BATCH:(i + 1) * BATCH]

    def close(self) -> None:
        """Nothing to stop: the batches are in memory."""


def _train_losses(tmp_path, margin: str, compat: str) -> list[float]:
    """Each micro-batch's loss over STEPS optimizer steps of the project's trainer, built from the composed config."""
    cfg = compose_config([f"compat={compat}", f"margin={margin}", "optimizer=sgd", f"optimizer.lr={LR}",
                    f"optimizer.weight_decay={WD}", f"trainer.gradient_acc={ACC}", "trainer.precision=fp32",
                    "trainer.grad_clip=5.0", f"embedding_size={EMBEDDING}", f"dataset.num_classes={CLASSES}"])
    check_config(cfg)
    check_compat(cfg)
    case = make_case()
    backbone = make_backbone(case)
    head = instantiate(cfg.pfc, margin=instantiate(cfg.margin))
    with torch.no_grad():
        head.weight.copy_(case["centres"])
    optimizer = build_optimizer(instantiate(cfg.optimizer), backbone, head)
    schedule = instantiate(cfg.scheduler, warmup_steps=WARMUP_STEPS, total_steps=STEPS)
    options = dataclasses.replace(trainer_options(cfg), verify_at_start=False, verify_at_end=False, save_every=0)
    losses: list[float] = []
    head.register_forward_hook(lambda module, args, loss: losses.append(loss.item()))
    Trainer(backbone, head, optimizer, _Batches(case["images"], case["labels"]), schedule, env=CPU,
            output_dir=tmp_path, options=options).fit()
    return losses


@pytest.mark.parametrize("margin", sorted(REFERENCE_LOSSES))
def test_reference_losses_reproduced(tmp_path, margin):
    losses = _train_losses(tmp_path, margin, "reference")
    expected = REFERENCE_LOSSES[margin]
    assert len(losses) == len(expected)
    assert max(abs(a - b) for a, b in zip(losses, expected)) < TOLERANCE


def test_default_maths_differ_from_the_reference(tmp_path):
    # The switch matters on this case: without it the later steps leave the reference's path.
    losses = _train_losses(tmp_path, "arcface", "default")
    assert losses[0] == pytest.approx(REFERENCE_LOSSES["arcface"][0], abs=TOLERANCE)
    assert max(abs(a - b) for a, b in zip(losses, REFERENCE_LOSSES["arcface"])) > 100 * TOLERANCE


def test_reference_warmup_schedule():
    schedule = PolynomialWarmup(3, 8, warmup="reference")
    factors = [schedule.factor(step) for step in range(8)]
    assert factors == pytest.approx(REFERENCE_LR, abs=1e-12)


@pytest.mark.parametrize("overrides", [["margin=combined"], ["margin=curricularface"], ["margin=sphereface"]])
def test_margins_without_a_reference_form_are_refused(overrides):
    with pytest.raises(UserError, match="compat=reference cannot follow margin"):
        check_compat(compose_config(["compat=reference", *overrides]))


def test_reference_xnorm_is_the_mean_norm_of_plain_and_flipped_embeddings():
    pairs = synthetic_pair_set(10, num_identities=4, first_identity=0, image_size=16)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 8))
    x = pairs.images.float().div(127.5).sub(1.0)
    with torch.no_grad():
        plain, flipped = model(x), model(x.flip(3))
    expected_reference = torch.cat([plain.norm(dim=1), flipped.norm(dim=1)]).mean().item()
    assert evaluate(model, pairs, 7, xnorm="reference").xnorm == pytest.approx(expected_reference, rel=1e-6)
    assert evaluate(model, pairs, 7).xnorm == pytest.approx((plain + flipped).norm(dim=1).mean().item(), rel=1e-6)


def test_dense_updates_decay_and_move_rows_that_were_not_sampled():
    # compat=reference's pfc.sparse_update=false: the centres are an ordinary dense parameter of torch's SGD, so
    # weight decay (and, from the second step, momentum) move every row, sampled or not, as in the reference.
    cfg = compose_config(["compat=reference", "pfc.rate=0.5", f"embedding_size={EMBEDDING}",
                    f"dataset.num_classes={CLASSES}"])
    case = make_case()
    backbone = make_backbone(case)
    head = instantiate(cfg.pfc, margin=instantiate(cfg.margin))
    optimizer = build_optimizer(instantiate(cfg.optimizer), backbone, head)
    before = head.weight.detach().clone()
    images = case["images"][:2].float().div(127.5).sub(1.0)
    head(backbone(images), case["labels"][:2]).backward()
    untouched = (head.weight.grad == 0).all(dim=1)
    assert untouched.any()
    optimizer.step()
    assert not torch.equal(head.weight[untouched], before[untouched])
