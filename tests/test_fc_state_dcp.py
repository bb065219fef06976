"""The classifier saved shard by shard (torch.distributed.checkpoint) on 1, 2 or 3 ranks loads on 1, 2 or 3 with every
row bit for bit; float32 rows load into bfloat16 storage and back; training checkpoints keep their rotation, clean up
after a crash, and checkpoints with the rows gathered inside still resume."""
from __future__ import annotations

from functools import partial
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
import torch.nn as nn

from arcface.distributed import barrier, gather_rows, get_rank, get_world_size
from arcface.engine.optim import build_optimizer
from arcface.engine.training_state import (load_training_state, newest_readable, read_classifier,
                                           save_training_state)
from arcface.errors import UserError
from arcface.heads import CurricularFace, PartialFC, load_fc_state, save_fc_shards, save_fc_state
from arcface.heads.fc_state import gathered_fc_state
from arcface.heads.sharding import shard_range
from arcface.testing import spawn_gloo

C, D, BATCH = 103, 8, 6  # 103 rows split unevenly over 2 and 3 ranks
OPTIMIZERS = {"sgd": partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4),
              "adamw": partial(torch.optim.AdamW, lr=1e-2, weight_decay=0.1)}


def _trained(optimizer: str, storage: str = "float32", seed: int = 0):
    """A head and optimizer after two steps (every row has optimizer state, half of them non-zero)."""
    torch.manual_seed(seed)
    head = PartialFC(CurricularFace(), D, C, rate=0.5, storage_dtype=storage)
    opt = build_optimizer(OPTIMIZERS[optimizer], nn.Linear(1, 1), head)
    data = torch.Generator().manual_seed(seed + 10 * get_rank())
    for _ in range(2):
        opt.zero_grad(set_to_none=True)
        head(torch.randn(BATCH, D, generator=data), torch.randint(0, C, (BATCH,), generator=data)).backward()
        opt.step()
    return head, opt


def _fresh(optimizer: str, storage: str = "float32"):
    torch.manual_seed(99 + get_rank())  # another initialisation, which the load must overwrite
    head = PartialFC(CurricularFace(), D, C, rate=0.5, storage_dtype=storage)
    return head, build_optimizer(OPTIMIZERS[optimizer], nn.Linear(1, 1), head)


def _rows(head, opt) -> dict:
    """Every row of the centres and of their optimizer state, gathered (rank 0; None elsewhere)."""
    state = opt.state.get(head.weight, {})
    rows = {"weight": gather_rows(head.weight.detach())}
    rows.update({name: gather_rows(value) for name, value in sorted(state.items()) if value.dim()})
    rows["margin"] = {k: v.clone() for k, v in head.margin.state_dict().items()}
    return rows if get_rank() == 0 else None


def _assert_rows_equal(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name in expected:
        if name == "margin":
            for buffer in expected[name]:
                assert torch.equal(got[name][buffer], expected[name][buffer]), buffer
        else:
            assert got[name].dtype == expected[name].dtype and torch.equal(got[name], expected[name]), name


def _save(folder: Path) -> None:
    """Save the sgd and adamw heads shard by shard into `folder`/<optimizer>, and every row for comparison."""
    for optimizer in OPTIMIZERS:
        head, opt = _trained(optimizer)
        if get_rank() == 0:
            (folder / optimizer).mkdir()
        barrier()
        small = save_fc_shards(head, opt, folder / optimizer)
        rows = _rows(head, opt)
        if get_rank() == 0:
            torch.save({"small": small, "rows": rows}, folder / f"{optimizer}.pt")


def _load(folders: list[Path]) -> dict:
    """Every saved folder loaded at this world size: what rank 0 gathered back, by (folder, optimizer)."""
    got = {}
    for folder in folders:
        for optimizer in OPTIMIZERS:
            saved = torch.load(folder / f"{optimizer}.pt")
            head, opt = _fresh(optimizer)
            load_fc_state(head, opt, saved["small"], folder / optimizer)
            got[str(folder), optimizer] = _rows(head, opt)
    return got


def _dtype_round_trip(folder: Path, scratch: Path) -> dict:
    """float32 rows into bfloat16 storage, saved again from there, and back into float32 storage."""
    saved = torch.load(folder / "sgd.pt")
    head, opt = _fresh("sgd", "bfloat16")
    load_fc_state(head, opt, saved["small"], folder / "sgd")
    as_bf16 = _rows(head, opt)
    if get_rank() == 0:
        scratch.mkdir()
    barrier()
    small = save_fc_shards(head, opt, scratch)
    head, opt = _fresh("sgd", "float32")
    load_fc_state(head, opt, small, scratch)
    return {"bf16": as_bf16, "back": _rows(head, opt)}


def _save_run(run_dir: Path, steps: list[int], keep: int) -> None:
    """Training checkpoints at `steps`, keeping `keep`, with every row of each step for comparison."""
    for step in steps:
        head, opt = _trained("sgd", seed=step)
        save_training_state(run_dir, keep, backbone=nn.Linear(2, 2), head=head, optimizer=opt,
                            scaler=torch.amp.GradScaler("cpu", enabled=False), step=step,
                            global_batch=BATCH * get_world_size(), extra={})
        rows = _rows(head, opt)
        if get_rank() == 0:
            torch.save(rows, run_dir / f"rows.{step}")


def _old_checkpoint(path: Path) -> None:
    """A checkpoint.pt as written before the sharded layout: the classifier gathered inside (format arcface.train/2)."""
    head, opt = _trained("adamw")
    fc = save_fc_state(head, opt)
    rows = _rows(head, opt)
    if get_rank() == 0:
        torch.save({"format": "arcface.train/2", "step": 7, "global_batch": BATCH * get_world_size(),
                    "backbone": nn.Linear(2, 2).state_dict(), "optimizer": opt.state_dict(), "scaler": {},
                    "fc": fc}, path)
        torch.save(rows, path.with_suffix(".rows"))


def _resume(path: Path, global_batch: int, optimizer: str) -> dict:
    head, opt = _fresh(optimizer)
    state = load_training_state(path, backbone=nn.Linear(2, 2), backbone_name="linear", head=head, optimizer=opt,
                                scaler=torch.amp.GradScaler("cpu", enabled=False), global_batch=global_batch)
    return {"step": state["step"], "rows": _rows(head, opt)}


def _at_two(rank: int, world: int, root: str) -> None:
    root = Path(root)
    got = {"load": _load([root / "w1"])}
    _save(root / "w2")
    _save_run(root / "run", [1, 2, 3], keep=2)
    _old_checkpoint(root / "old.pt")
    if rank == 0:
        torch.save(got, root / "got2.pt")


def _at_three(rank: int, world: int, root: str) -> None:
    root = Path(root)
    got = {"load": _load([root / "w1", root / "w2"]),
           "dtypes": _dtype_round_trip(root / "w2", root / "bf16"),
           "run": _resume(root / "run" / "checkpoint.1.pt", BATCH * 2, "sgd"),
           "old": _resume(root / "old.pt", BATCH * 2, "adamw")}
    _save(root / "w3")
    if rank == 0:
        torch.save(got, root / "got3.pt")


@pytest.fixture(scope="module")
def chain(tmp_path_factory) -> Path:
    """Saved at 1 rank (no process group); at 2: loaded, saved, training checkpoints and a gathered-layout one
    written; at 3: everything loaded, saved; at 1 again: the 2- and 3-rank saves loaded. Two spawns in all."""
    root = tmp_path_factory.mktemp("chain")
    (root / "w1").mkdir()
    _save(root / "w1")
    for world, job in ((2, _at_two), (3, _at_three)):
        (root / f"w{world}").mkdir()
        spawn_gloo(job, world, str(root))
    torch.save({"load": _load([root / "w2", root / "w3"])}, root / "got1.pt")
    return root


def test_rows_reshard_bit_for_bit_between_world_sizes(chain):
    pairs = set()
    for world in (1, 2, 3):
        for (folder, optimizer), rows in torch.load(chain / f"got{world}.pt")["load"].items():
            expected = torch.load(Path(folder) / f"{optimizer}.pt")["rows"]
            assert set(rows) == ({"weight", "momentum_buffer", "margin"} if optimizer == "sgd"
                                 else {"weight", "exp_avg", "exp_avg_sq", "step", "margin"})
            _assert_rows_equal(rows, expected)
            pairs.add((int(Path(folder).name[1:]), world))
    assert pairs == {(1, 2), (1, 3), (2, 3), (2, 1), (3, 1)}  # (saved at, loaded at)


def test_each_rank_writes_its_own_rows_at_their_global_offsets(chain):
    for world in (1, 2, 3):
        metadata = dcp.FileSystemReader(str(chain / f"w{world}" / "sgd")).read_metadata()
        chunks = metadata.state_dict_metadata["weight"].chunks
        files = {index.offset[0]: info.relative_path for index, info in metadata.storage_data.items()
                 if index.fqn == "weight"}
        for rank in range(world):
            start, count = shard_range(C, rank, world)
            assert any(list(c.offsets) == [start, 0] and list(c.sizes) == [count, D] for c in chunks)
            assert files[start] == f"__{rank}_0.distcp"
        assert len(chunks) == world


def test_float32_rows_load_into_bfloat16_storage_and_back(chain):
    got = torch.load(chain / "got3.pt")["dtypes"]
    expected = torch.load(chain / "w2" / "sgd.pt")["rows"]
    for name in ("weight", "momentum_buffer"):
        assert got["bf16"][name].dtype == torch.bfloat16
        assert torch.equal(got["bf16"][name], expected[name].bfloat16()), name  # rounded to nearest
        assert got["back"][name].dtype == torch.float32
        assert torch.equal(got["back"][name], expected[name].bfloat16().float()), name
    # The same conversion from the gathered layout, in one process.
    head, opt = _fresh("sgd", "bfloat16")
    load_fc_state(head, opt, gathered_fc_state(torch.load(chain / "w2" / "sgd.pt")["small"], chain / "w2" / "sgd"))
    assert torch.equal(head.weight.detach(), expected["weight"].bfloat16())


def _shards_named(path: Path) -> str:
    return torch.load(path, weights_only=True)["fc"]["shards"]


def test_training_checkpoints_rotate_with_their_shards_and_resume_elsewhere(chain):
    run = chain / "run"  # saved at steps 1, 2, 3 on 2 ranks, keeping 2
    checkpoints = sorted(p.name for p in run.glob("checkpoint*.pt"))
    assert checkpoints == ["checkpoint.1.pt", "checkpoint.pt"]
    named = {_shards_named(run / name) for name in checkpoints}
    assert {p.name for p in run.iterdir() if p.is_dir()} == named  # step 1's shards went with its checkpoint
    assert _shards_named(run / "checkpoint.pt").startswith("classifier.3.")
    whole, expected = read_classifier(run / "checkpoint.pt"), torch.load(run / "rows.3")
    assert torch.equal(whole["weight"], expected["weight"])
    assert torch.equal(whole["optimizer_rows"]["momentum_buffer"], expected["momentum_buffer"])
    resumed = torch.load(chain / "got3.pt")["run"]  # checkpoint.1.pt on 3 ranks
    assert resumed["step"] == 2
    _assert_rows_equal(resumed["rows"], torch.load(run / "rows.2"))


def test_a_crash_leaves_nothing_that_resumes_wrong(tmp_path):
    """Shards of a save that never committed, and a checkpoint whose shards are gone: the newest complete checkpoint
    is chosen, the one without its shards is named, and the next save clears the leftovers."""
    _save_run(tmp_path, [1, 2], 3)
    (tmp_path / ".classifier.3.0badc0de.tmp").mkdir()  # killed while writing
    (tmp_path / "classifier.3.0badc0de").mkdir()  # killed between the directory's rename and checkpoint.pt's
    newest = tmp_path / "checkpoint.pt"
    lost = tmp_path / _shards_named(newest)
    for name in lost.iterdir():
        name.unlink()
    lost.rmdir()
    found, skipped = newest_readable(tmp_path)
    assert found == tmp_path / "checkpoint.1.pt"
    assert len(skipped) == 1 and str(lost) in skipped[0] and "missing or incomplete" in skipped[0]
    with pytest.raises(UserError, match="missing or incomplete"):
        read_classifier(newest)
    _save_run(tmp_path, [4], 3)
    kept = {_shards_named(p) for p in tmp_path.glob("checkpoint*.pt") if p != tmp_path / "checkpoint.1.pt"}
    assert {p.name for p in tmp_path.iterdir() if p.is_dir()} == kept
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


def test_checkpoints_with_gathered_rows_still_resume(chain):
    expected = torch.load(chain / "old.rows")  # written on 2 ranks
    resumed = torch.load(chain / "got3.pt")["old"]
    assert resumed["step"] == 7
    _assert_rows_equal(resumed["rows"], expected)
    assert torch.equal(read_classifier(chain / "old.pt")["weight"], expected["weight"])
