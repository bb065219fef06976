"""`arcface-train`: compose the config from conf/, build every part with `instantiate`, train, report.

    arcface-train                                   # the CPU demo on synthetic identities
    arcface-train backbone=r50 pfc.rate=0.3 optimizer=adamw optimizer.lr=1e-3
    arcface-train experiment=ms1mv3_r50 dataset.root=/data/ms1m-retinaface-t1
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from arcface.data.loader import build_loader
from arcface.distributed import broadcast_object, init_distributed, shutdown_distributed
from arcface.engine.optim import build_optimizer
from arcface.engine.tracking import NullTracker
from arcface.engine.trainer import Trainer
from arcface.errors import UserError

log = logging.getLogger("arcface")


def _user_error(exc: BaseException) -> UserError | None:
    """The UserError behind `exc`, also when Hydra's instantiate wrapped it."""
    while exc is not None:
        if isinstance(exc, UserError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


PRECISIONS = ("fp32", "fp16", "bf16")


def _check_trainer(trainer: DictConfig) -> None:
    """Catch impossible trainer values up front, with the key to fix, instead of deep inside the loop."""
    for key in ("batch_size", "gradient_acc"):
        if trainer[key] < 1:
            raise UserError(f"trainer.{key}={trainer[key]} must be at least 1")
    for key in ("log_every", "verify_every", "save_every", "num_workers"):
        if trainer[key] < 0:
            raise UserError(f"trainer.{key}={trainer[key]} must be 0 (off) or more")
    if trainer.precision not in PRECISIONS:
        raise UserError(f"trainer.precision={trainer.precision} is unknown: use one of {', '.join(PRECISIONS)}")


def _total_steps(cfg: DictConfig, batches_per_epoch: int) -> tuple[int, int]:
    """(warmup steps, total steps) in optimizer steps; `trainer.max_steps` caps the run and the schedule with it."""
    steps_per_epoch = batches_per_epoch // cfg.trainer.gradient_acc
    if steps_per_epoch == 0:
        raise UserError(f"the dataset gives {batches_per_epoch} batches per rank, fewer than trainer.gradient_acc="
                        f"{cfg.trainer.gradient_acc}: lower trainer.batch_size or trainer.gradient_acc")
    total = steps_per_epoch * cfg.trainer.num_epoch
    if cfg.trainer.max_steps is not None:
        total = min(total, cfg.trainer.max_steps)
    if total < 1:
        raise UserError(f"the run has no steps (trainer.num_epoch={cfg.trainer.num_epoch}, trainer.max_steps="
                        f"{cfg.trainer.max_steps}): set both to at least 1")
    return steps_per_epoch * cfg.trainer.warmup_epoch, total


def _resume_path(resume: str | None, own_checkpoint: Path) -> Path | None:
    """`trainer.resume`: null = start afresh, auto = this run dir's checkpoint.pt if there is one, else a path.

    Rank 0 decides for everyone: a rank that saw a different answer would run mismatched collectives.
    """
    if resume == "auto":
        resume = str(own_checkpoint) if own_checkpoint.is_file() else None
    resume = broadcast_object(resume)
    return None if resume is None else Path(resume)


def train(cfg: DictConfig) -> dict:
    _check_trainer(cfg.trainer)
    env = init_distributed()
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    torch.manual_seed(cfg.trainer.seed)
    dataset = instantiate(cfg.dataset.train)
    val_sets = {name: instantiate(node) for name, node in cfg.dataset.val.items()} if env.is_main else {}
    backbone = instantiate(cfg.backbone).to(env.device)
    head = instantiate(cfg.pfc.head, margin=instantiate(cfg.margin)).to(env.device)
    optimizer = build_optimizer(instantiate(cfg.optimizer), backbone, head)
    loader = build_loader(dataset, cfg.trainer.batch_size, rank=env.rank, world_size=env.world_size,
                          seed=cfg.trainer.seed, num_workers=cfg.trainer.num_workers, device=env.device)
    warmup, total = _total_steps(cfg, len(loader))
    schedule = instantiate(cfg.scheduler, warmup_steps=warmup, total_steps=total)
    tracker = instantiate(cfg.tracking) if env.is_main else NullTracker()
    trainer = Trainer(backbone, head, optimizer, loader, schedule, env=env, output_dir=output_dir,
                      val_sets=val_sets, tracker=tracker, precision=cfg.trainer.precision,
                      gradient_acc=cfg.trainer.gradient_acc, grad_clip=cfg.trainer.grad_clip,
                      log_every=cfg.trainer.log_every, verify_every=cfg.trainer.verify_every,
                      verify_at_start=cfg.trainer.verify_at_start, eval_batch_size=cfg.trainer.batch_size,
                      save_every=cfg.trainer.save_every, backbone_name=cfg.backbone.name)
    resume_from = _resume_path(cfg.trainer.resume, trainer.checkpoint_path)
    tracker.start(OmegaConf.to_container(cfg, resolve=True),
                  tags={"backbone": cfg.backbone.name, "dataset": cfg.dataset.name, "world_size": env.world_size})
    try:
        tracker.log_artifacts(output_dir / ".hydra", artifact_path="hydra")
        log.info("training %s on %s (%d images, %d classes) for %d steps on %d %s process(es); outputs in %s",
                 cfg.backbone.name, cfg.dataset.name, len(dataset), cfg.dataset.num_classes, total, env.world_size,
                 env.device.type, output_dir)
        if resume_from is not None:
            trainer.resume(resume_from)
        # Initialisation above is identical on every rank; augmentation must differ between ranks.
        torch.manual_seed(cfg.trainer.seed + env.rank)
        results = trainer.fit()
    except BaseException:
        tracker.end("FAILED")
        raise
    for name, accs in results.items():
        before = f"random-init accuracy {accs['initial']:.4f} -> " if "initial" in accs else ""
        log.info("verification %s: %strained accuracy %.4f", name, before, accs["final"])
    tracker.end()
    return results


# An absolute path: relative ones are read as a Python package when started through the console script.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        train(cfg)
    except Exception as exc:
        error = _user_error(exc)
        if error is None:
            raise
        print(f"error: {error}", file=sys.stderr)
        sys.exit(2)
    finally:
        shutdown_distributed()


if __name__ == "__main__":
    main()
