"""A Partial FC training step never waits for the device at a sample rate above zero (checked on the CPU through the
ops that would make a GPU wait), and the fixed-size code that makes this so computes exactly what the
straightforward, boolean-indexed formulation computes."""
from __future__ import annotations

import importlib.util
import linecache
from functools import partial
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from arcface.engine.optim import build_optimizer
from arcface.heads import AdaFace, CombinedMargin, CurricularFace, PartialFC
from arcface.heads.softmax import sharded_cross_entropy
from arcface.testing import spawn_gloo

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("host_syncs", REPO / "benchmarks" / "host_syncs.py")
host_syncs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(host_syncs)

C, D, B = 1000, 16, 8
OPTIMIZERS = {"sgd": partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4),
              "adamw": partial(torch.optim.AdamW, lr=1e-3, weight_decay=0.1)}
MARGINS = {
    "arcface": lambda: CombinedMargin(s=64, m1=1.0, m2=0.5, m3=0.0),
    "cosface": lambda: CombinedMargin(s=64, m1=1.0, m2=0.0, m3=0.4),
    "sphereface": lambda: CombinedMargin(s=64, m1=1.7, m2=0.0, m3=0.0),
    "combined": lambda: CombinedMargin(s=64, m1=1.2, m2=0.3, m3=0.2),
    "arcface_filtered": lambda: CombinedMargin(interclass_filtering_threshold=0.2),
    "curricularface": lambda: CurricularFace(interclass_filtering_threshold=0.2),
    "adaface": lambda: AdaFace(),
}


def _setup(rate: float, margin: str = "arcface", optimizer: str = "sgd"):
    torch.manual_seed(0)
    head = PartialFC(MARGINS[margin](), D, C, rate)
    head.sync_free = True  # the GPU's paths, here on the CPU
    backbone = nn.Linear(D, D)
    return head, backbone, build_optimizer(OPTIMIZERS[optimizer], backbone, head)


def _recorded_steps(head, backbone, optimizer, steps: int = 2, seed: int = 0) -> list[tuple[str, str]]:
    """Host reads of `steps` full training steps (forward, backward, optimizer step, zero_grad)."""
    g = torch.Generator().manual_seed(seed)
    with host_syncs.HostReads() as reads:
        for _ in range(steps):
            loss = head(backbone(torch.randn(B, D, generator=g)), torch.randint(0, C, (B,), generator=g))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return reads.sites


@pytest.mark.parametrize("margin", sorted(MARGINS))
def test_training_step_at_rate_01_reads_nothing_back(margin):
    assert _recorded_steps(*_setup(0.1, margin)) == []


def test_row_wise_adamw_reads_nothing_back():
    # torch's own AdamW (the backbone's) reads its step counts, CPU tensors also on a GPU: only those reads remain.
    sites = _recorded_steps(*_setup(0.1, optimizer="adamw"))
    lines = {linecache.getline(str(REPO / where.split(":")[0]), int(where.split(":")[1].split()[0])).strip()
             for where, _ in sites}
    assert lines == {"self.dense.step()"}, sites


def test_rate_zero_reads_the_positives_once():
    # The sample is the positives alone, so the logits' width is the number of classes in the batch.
    sites = _recorded_steps(*_setup(0.0), steps=1)
    assert len(sites) == 1 and "(sample_centres)" in sites[0][0] and sites[0][1] == "nonzero", sites


def _distributed_reads(rank: int, world: int, out: str) -> None:
    torch.set_num_threads(1)
    head, backbone, optimizer = _setup(0.1, "curricularface")
    # Each rank's targets mostly live on another rank's shard: the rows without a local target are exercised.
    torch.save(_recorded_steps(head, backbone, optimizer, seed=rank), f"{out}/{rank}.pt")


def test_two_ranks_read_nothing_back(tmp_path):
    spawn_gloo(_distributed_reads, 2, str(tmp_path))
    assert [torch.load(tmp_path / f"{r}.pt") for r in range(2)] == [[], []]


def test_first_gradient_is_marked_coalesced_and_accumulation_is_not():
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(B, D, generator=g), torch.randint(0, C, (B,), generator=g)) for _ in range(2)]
    head, _, _ = _setup(0.1)
    singles = []
    for batch in batches:
        head.weight.grad = None
        head(*batch).backward()
        grad = head.weight.grad
        assert grad.is_coalesced() and torch.equal(grad._indices()[0], head._grad_rows)
        singles.append(grad.to_dense())
    head, _, _ = _setup(0.1)  # the same start and the same samples, now two micro-batches accumulated
    for batch in batches:
        head(*batch).backward()
    summed = head.weight.grad
    assert not torch.equal(summed._indices()[0], head._grad_rows)
    assert torch.equal(summed.to_dense(), singles[0] + singles[1])


def test_marked_and_unmarked_gradients_give_the_same_update():
    results = []
    for mark in (True, False):
        head, backbone, optimizer = _setup(0.1, optimizer="adamw")
        g = torch.Generator().manual_seed(2)
        for _ in range(2):
            head(backbone(torch.randn(B, D, generator=g)), torch.randint(0, C, (B,), generator=g)).backward()
            grad = head.weight.grad
            if not mark:  # what the optimizer checks on the device when nothing vouches for the order
                head.weight.grad = torch.sparse_coo_tensor(grad._indices(), grad._values(), grad.shape,
                                                           check_invariants=True)
            assert head.weight.grad.is_coalesced() == mark
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        results.append((head.weight.detach(), optimizer.state[head.weight]))
    (w1, s1), (w2, s2) = results
    assert torch.equal(w1, w2) and all(torch.equal(s1[k], s2[k]) for k in s1)


def test_sync_free_paths_equal_the_cpu_paths():
    runs = []
    for sync_free in (True, None):
        head, backbone, optimizer = _setup(0.1, "curricularface")
        head.sync_free = sync_free
        g = torch.Generator().manual_seed(3)
        losses = []
        for _ in range(3):
            loss = head(backbone(torch.randn(B, D, generator=g)), torch.randint(0, C, (B,), generator=g))
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            losses.append(loss.detach())
        runs.append((torch.stack(losses), head.weight.detach(), optimizer.state[head.weight]["momentum_buffer"]))
    assert all(torch.equal(a, b) for a, b in zip(*runs))


# ---- bit-identity of the fixed-size formulation ------------------------------------------------------------------

def _logits_and_labels(columns: int, foreign: list[int], seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.rand(6, columns, generator=g) * 1.8 - 0.9
    labels = torch.randint(0, max(columns, 1), (6,), generator=g)
    labels[foreign] = -1  # rows whose target centre lives on another shard
    return logits, labels


@pytest.mark.parametrize("name", sorted(MARGINS))
@pytest.mark.parametrize("columns, foreign", [(9, []), (9, [1, 4]), (9, list(range(6))), (0, list(range(6)))],
                         ids=["all-here", "some-elsewhere", "none-here", "no-columns"])
def test_margin_equals_its_value_with_foreign_targets_in_a_dropped_column(name, columns, foreign):
    """Rows whose target is elsewhere must come out as if their target sat in an extra column that is then dropped:
    every output and gradient bit equal, running statistics included."""
    logits, labels = _logits_and_labels(columns, foreign)
    target_cosine = torch.rand(6, generator=torch.Generator().manual_seed(1)) * 1.8 - 0.9
    norms = torch.rand(6, generator=torch.Generator().manual_seed(2)) * 30 + 5
    padded = torch.cat([logits, target_cosine.unsqueeze(1)], dim=1).requires_grad_()
    routed = torch.where(labels >= 0, labels, columns)
    margin_ref, margin = MARGINS[name](), MARGINS[name]()
    expected = margin_ref(padded, routed, target_cosine=target_cosine, norms=norms)[:, :columns]
    upstream = torch.randn(expected.shape, generator=torch.Generator().manual_seed(3))
    expected.backward(upstream)
    logits.requires_grad_()
    out = margin(logits, labels, target_cosine=target_cosine, norms=norms)
    out.backward(upstream)
    assert torch.equal(out, expected)
    assert torch.equal(logits.grad, padded.grad[:, :columns])
    for (key, value), (_, ref) in zip(margin.named_buffers(), margin_ref.named_buffers()):
        assert torch.equal(value, ref), key


def _indexed_cross_entropy(logits: torch.Tensor, labels: torch.Tensor):
    """One process's sharded cross-entropy written with boolean indexing: (loss, gradient of the logits)."""
    rows = labels >= 0
    row_max = logits.amax(dim=1)
    probs = (logits - row_max.unsqueeze(1)).exp()
    sum_exp = probs.sum(dim=1)
    target = torch.zeros_like(row_max)
    target[rows] = logits[rows, labels[rows]]
    probs /= sum_exp.unsqueeze(1)
    probs[rows, labels[rows]] -= 1
    return (sum_exp.log() + row_max - target).mean(), probs * (torch.ones(()) / logits.shape[0])


@pytest.mark.parametrize("foreign", [[], [0, 3], list(range(6))], ids=["all-here", "some-elsewhere", "none-here"])
def test_sharded_cross_entropy_equals_the_indexed_formulation(foreign):
    logits, labels = _logits_and_labels(9, foreign)
    logits = (logits * 64).requires_grad_()
    loss = sharded_cross_entropy(logits, labels)
    loss.backward()
    expected_loss, expected_grad = _indexed_cross_entropy(logits.detach(), labels)
    assert torch.equal(loss, expected_loss) and torch.equal(logits.grad, expected_grad)
