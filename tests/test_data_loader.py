"""Sampler and loader: determinism under a seed, disjoint and complete shards, mid-epoch resume, batch contract."""
from __future__ import annotations

import multiprocessing

import numpy as np
import pytest
import torch

from arcface.data import RecordDataset, SyntheticIdentities
from arcface.data.loader import build_loader, load_batch
from arcface.data.sampler import ShardedBatchSampler
from arcface.data.transforms import prepare_batch
from arcface.errors import UserError
from conftest import FIXTURES

CPU = torch.device("cpu")


def epoch_batches(sampler: ShardedBatchSampler, epoch: int, start_batch: int = 0) -> list[list[int]]:
    sampler.set_epoch(epoch, start_batch)
    return list(sampler)


def test_sampler_is_deterministic_and_reshuffles_per_epoch():
    a = ShardedBatchSampler(100, 8, seed=5)
    b = ShardedBatchSampler(100, 8, seed=5)
    assert epoch_batches(a, 0) == epoch_batches(b, 0)
    assert epoch_batches(a, 0) != epoch_batches(a, 1)
    assert epoch_batches(a, 0) != epoch_batches(ShardedBatchSampler(100, 8, seed=6), 0)


@pytest.mark.parametrize("size,world", [(103, 2), (96, 3), (50, 4)])
def test_shards_are_disjoint_equal_and_complete(size, world):
    shards = [ShardedBatchSampler(size, 1, rank=r, world_size=world, seed=1).shard() for r in range(world)]
    assert len({len(s) for s in shards}) == 1
    flat = np.concatenate(shards)
    assert len(set(flat.tolist())) == len(flat) == size - size % world
    batches = [epoch_batches(ShardedBatchSampler(size, 4, rank=r, world_size=world, seed=1), 2) for r in range(world)]
    assert len({len(b) for b in batches}) == 1
    seen = [i for rank in batches for batch in rank for i in batch]
    assert len(seen) == len(set(seen)) == world * (size // world // 4) * 4


def test_resume_mid_epoch_gives_the_remaining_batches():
    sampler = ShardedBatchSampler(200, 10, rank=1, world_size=2, seed=9)
    full = epoch_batches(sampler, 3)
    assert epoch_batches(sampler, 3, start_batch=4) == full[4:]
    assert list(sampler) == full  # the offset applies to one pass only
    with pytest.raises(ValueError):
        sampler.set_epoch(0, start_batch=len(sampler) + 1)


@pytest.fixture(scope="module")
def record_data() -> RecordDataset:
    return RecordDataset(str(FIXTURES / "insightface_header"), num_classes=12)


def _collect(loader, epoch: int, start_batch: int = 0):
    loader.set_epoch(epoch, start_batch)
    return [(images.clone(), labels.clone()) for images, labels in loader]


def test_loader_contract_and_worker_equivalence(record_data):
    serial = build_loader(record_data, 8, rank=0, world_size=1, seed=3, num_workers=0, device=CPU)
    parallel = build_loader(record_data, 8, rank=0, world_size=1, seed=3, num_workers=2, device=CPU)
    assert len(serial) == len(parallel) == 6
    a, b = _collect(serial, 1), _collect(parallel, 1)
    assert len(a) == 6
    for (ia, la), (ib, lb) in zip(a, b):
        assert ia.dtype == torch.uint8 and tuple(ia.shape) == (8, 3, 112, 112)
        assert la.dtype == torch.int64 and tuple(la.shape) == (8,)
        assert torch.equal(ia, ib) and torch.equal(la, lb)
    # every image of the epoch, each once, with its own label
    labels = torch.cat([l for _, l in a]).sort().values
    assert labels.tolist() == sorted(record_data[i][1] for i in range(48))


def test_loader_batches_match_the_dataset_items(record_data):
    loader = build_loader(record_data, 4, rank=1, world_size=2, seed=0, num_workers=0, device=CPU)
    loader.set_epoch(0)
    images, labels = next(iter(loader))
    indices = loader.sampler.shard()[:4]
    for k, i in enumerate(indices):
        image, label = record_data[int(i)]
        assert torch.equal(images[k], image) and labels[k] == label


def test_loader_resumes_mid_epoch(record_data):
    loader = build_loader(record_data, 4, rank=0, world_size=2, seed=0, num_workers=0, device=CPU)
    full = _collect(loader, 2)
    resumed = _collect(loader, 2, start_batch=2)
    assert len(resumed) == len(full) - 2
    assert all(torch.equal(x[1], y[1]) for x, y in zip(full[2:], resumed))


def test_generic_dataset_batches_by_stacking():
    data = SyntheticIdentities(num_classes=3, images_per_class=2, image_size=112)
    images = torch.empty(3, 3, 112, 112, dtype=torch.uint8)
    labels = load_batch(data, [0, 5, 2], images)
    assert torch.equal(images[1], data[5][0]) and labels.tolist() == [0, 2, 1]


def test_unknown_loader_is_a_user_error(record_data):
    with pytest.raises(UserError, match="dataset.loader=tensorflow"):
        build_loader(record_data, 4, rank=0, world_size=1, seed=0, num_workers=0, device=CPU, loader="tensorflow")


def test_prepare_batch_scales_flips_and_is_contiguous():
    images = torch.randint(0, 256, (64, 112, 112, 3), dtype=torch.uint8).permute(0, 3, 1, 2)  # channels-last
    torch.manual_seed(0)
    x = prepare_batch(images, CPU, flip=True)
    assert x.dtype == torch.float32 and x.is_contiguous() and x.min() >= -1 and x.max() <= 1
    expected = images.float() / 127.5 - 1
    same = [torch.allclose(x[i], expected[i], atol=1e-6) for i in range(64)]
    mirrored = [torch.allclose(x[i], expected[i].flip(2), atol=1e-6) for i in range(64)]
    assert all(s or m for s, m in zip(same, mirrored)) and 10 < sum(mirrored) < 54
    assert torch.allclose(prepare_batch(images, CPU, flip=False), expected, atol=1e-6)


def test_abandoned_epoch_does_not_leak_into_the_next(record_data):
    # Workers may still be filling ring slots of the abandoned epoch when the next one starts.
    serial = build_loader(record_data, 4, rank=0, world_size=1, seed=2, num_workers=0, device=CPU)
    parallel = build_loader(record_data, 4, rank=0, world_size=1, seed=2, num_workers=2, device=CPU)
    parallel.set_epoch(0)
    next(iter(parallel))
    for (ia, la), (ib, lb) in zip(_collect(serial, 1), _collect(parallel, 1)):
        assert torch.equal(ia, ib) and torch.equal(la, lb)


def test_close_stops_the_workers_at_once(record_data):
    # Persistent workers outlive an abandoned epoch; the trainer closes the loader when training ends.
    before = set(multiprocessing.active_children())  # other tests' loaders may not be collected yet
    loader = build_loader(record_data, 4, rank=0, world_size=1, seed=2, num_workers=2, device=CPU)
    loader.set_epoch(0)
    next(iter(loader))
    workers = set(multiprocessing.active_children()) - before
    assert len(workers) == 2
    loader.close()
    assert not workers & set(multiprocessing.active_children())
