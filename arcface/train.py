"""`arcface-train`: compose the config from conf/, build every part with `instantiate`, train, report.

    arcface-train                                   # the CPU demo on synthetic identities
    arcface-train backbone=r50 pfc.rate=0.3 optimizer=adamw optimizer.lr=1e-3
    arcface-train experiment=ms1mv3_r50 dataset.root=/data/ms1m-retinaface-t1
"""
from __future__ import annotations

import logging
import os
import shlex
import sys
from dataclasses import fields
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from arcface.cluster import (register_resolvers, requeue, requeue_signal, submitit_requeue_handler,
                             warn_if_not_submitted)
from arcface.compat import check_compat
from arcface.config_checks import check_added_keys, check_config, check_group_choices
from arcface.data.loader import build_loader
from arcface.distributed import DistEnv, broadcast_object, get_rank, init_distributed, shutdown_distributed
from arcface.engine.training_state import CHECKPOINT_NAME, newest_readable, refuse_fresh_start_over
from arcface.engine.optim import build_optimizer
from arcface.engine.stopping import EXIT_STOPPED, StopRequest
from arcface.engine.tracking import NullTracker, settings
from arcface.engine.trainer import Trainer, TrainerOptions
from arcface.errors import UserError, exit_with_error
from arcface.evaluation.selection import selected_pair_sets
from arcface.fileio import remove_stale_temporaries
from arcface.sweep import job_tags

log = logging.getLogger("arcface")


def _user_error(exc: BaseException) -> UserError | None:
    """The UserError behind `exc`, also when Hydra's instantiate wrapped it."""
    while exc is not None:
        if isinstance(exc, UserError):
            return exc
        exc = exc.__cause__ or exc.__context__
    return None


def _total_steps(cfg: DictConfig, num_images: int, world_size: int, batches_per_epoch: int) -> tuple[int, int]:
    """(warmup steps, total steps) in optimizer steps; `trainer.max_steps` caps the run and the schedule with it."""
    acc = cfg.trainer.gradient_acc
    steps_per_epoch = batches_per_epoch // acc
    if steps_per_epoch == 0:
        largest = num_images // (world_size * acc)
        fix = (f"set trainer.batch_size to at most {largest}" if largest else
               "use fewer ranks or a smaller trainer.gradient_acc, or more images")
        source = OmegaConf.select(cfg, "dataset.root", default=None) or f"dataset={cfg.dataset.name}"
        raise UserError(f"{source} has {num_images} images, which {world_size} rank(s) at trainer.batch_size="
                        f"{cfg.trainer.batch_size} split into {batches_per_epoch} full batch(es) each, fewer than the "
                        f"trainer.gradient_acc={acc} a step needs: {fix}")
    total = steps_per_epoch * cfg.trainer.num_epoch
    if cfg.trainer.max_steps is not None:
        total = min(total, cfg.trainer.max_steps)
    return steps_per_epoch * cfg.trainer.warmup_epoch, total


def _resume_path(resume: str | None, run_dir: Path) -> Path | None:
    """`trainer.resume`: null = start afresh (refused over an earlier run's checkpoint), auto = the newest checkpoint
    in this run dir that loads, else a path.

    Rank 0 decides for everyone (a rank that saw a different answer would run mismatched collectives) and says
    what it decided.
    """
    refuse_fresh_start_over(run_dir, resume)
    if resume == "auto" and get_rank() == 0:
        found, skipped = newest_readable(run_dir)
        for reason in skipped:
            log.warning("skipping a checkpoint that does not load: %s", reason)
        if found is None:
            log.info("trainer.resume=auto found no checkpoint in %s: starting afresh (to continue an earlier run, "
                     "add hydra.run.dir=<that run's directory>)", run_dir)
        resume = None if found is None else str(found)
    resume = broadcast_object(resume)
    return None if resume is None else Path(resume)


def _resume_command(run_dir: Path) -> str:
    """The command line that continues this run: the same program and overrides, this run dir, resume=auto."""
    overrides = [o for o in HydraConfig.get().overrides.task
                 if not o.startswith(("trainer.resume=", "hydra.run.dir="))]
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", 1))
    nodes = int(os.environ.get("WORLD_SIZE", per_node)) // per_node
    if "TORCHELASTIC_RUN_ID" in os.environ and nodes > 1:  # the same nodes again, each with its own NODE_RANK
        return " ".join([f"NNODES={nodes} NODE_RANK=<0..{nodes - 1}, one per node> "
                         f"MASTER_ADDR={os.environ.get('MASTER_ADDR', '<node 0>')} "
                         f"MASTER_PORT={os.environ.get('MASTER_PORT', 29500)} RUN_DIR={shlex.quote(str(run_dir))} "
                         f"launchers/torchrun_multinode.sh {per_node}", *map(shlex.quote, overrides),
                         "trainer.resume=auto"])
    if "TORCHELASTIC_RUN_ID" in os.environ:
        program = f"torchrun --nproc_per_node={per_node} -m arcface.train"
    elif Path(sys.argv[0]).name == "arcface-train":
        program = "arcface-train"
    else:
        program = "python -m arcface.train"
    return " ".join([program, *map(shlex.quote, overrides), shlex.quote(f"hydra.run.dir={run_dir}"),
                     "trainer.resume=auto"])


def trainer_options(cfg: DictConfig) -> TrainerOptions:
    """The loop's settings: each field is the `trainer.*` key of its name, and eval_batch_size is trainer.batch_size."""
    keys = [f.name for f in fields(TrainerOptions) if f.name != "eval_batch_size"]
    missing = [key for key in keys if key not in cfg.trainer]
    if missing:
        raise UserError(f"trainer.{missing[0]} is missing from the config: keep it (conf/train.yaml sets it) "
                        f"instead of deleting it")
    return TrainerOptions(eval_batch_size=cfg.trainer.batch_size, **{key: cfg.trainer[key] for key in keys})


def _console_warnings_only() -> None:
    """A rank other than 0 keeps its progress to its own rank<k>.log: on a shared console, lines would repeat."""
    for handler in logging.getLogger().handlers:
        if type(handler) is logging.StreamHandler:  # Hydra's console handler; file handlers are subclasses
            handler.setLevel(logging.WARNING)


def _cpu_precision(cfg: DictConfig, env: DistEnv) -> None:
    """fp16 on a CPU-only run trains in fp32 instead, saying so once: the fp16 loss scaler needs CUDA, and CPU
    autocast to fp16 measured 4-8x slower than fp32 (r_tiny and r18, forward and backward, 2 cores)."""
    if env.device.type != "cpu":
        return
    changed = [key for key in ("trainer.precision", "backbone.precision") if OmegaConf.select(cfg, key) == "fp16"]
    for key in changed:  # backbone.precision usually follows trainer.precision through an interpolation
        OmegaConf.update(cfg, key, "fp32")
    if changed and env.is_main:
        log.warning("%s=fp16 needs a CUDA device: this CPU-only run trains in fp32 instead (fp16 on CPU runs "
                    "without loss scaling and several times slower); set trainer.precision=fp32 to silence this",
                    changed[0])


def _how(cfg: DictConfig, backbone) -> str:
    """How the backbone trains, as resolved on this machine (the config may say backbone.channels_last=auto)."""
    parts = [cfg.trainer.precision, "channels_last" if getattr(backbone, "channels_last", False) else "NCHW"]
    if cfg.trainer.compile:
        parts.append(f"compiled ({'default' if cfg.trainer.compile is True else cfg.trainer.compile})")
    return ", ".join(parts)


def _count_classes(cfg: DictConfig, dataset) -> None:
    """dataset.num_classes=null: the dataset counted its classes (dataset=folder); the head is built for them."""
    if cfg.dataset.num_classes is None:
        cfg.dataset.num_classes = dataset.num_classes
        log.info("dataset.num_classes=%d, counted in %s", dataset.num_classes, getattr(dataset, "root", "the data"))


def train(cfg: DictConfig, stop_request: StopRequest) -> str | None:
    """Build everything and train; returns the signal that stopped the run early (state saved), or None."""
    check_config(cfg)
    hydra_cfg = HydraConfig.get()
    check_added_keys(cfg, list(hydra_cfg.overrides.task), set(hydra_cfg.runtime.choices))
    check_compat(cfg)
    warn_if_not_submitted(cfg, multirun=hydra_cfg.mode == RunMode.MULTIRUN)
    env = init_distributed(timeout_s=cfg.trainer.dist_timeout_s)
    if not env.is_main:
        _console_warnings_only()
    output_dir = Path(hydra_cfg.runtime.output_dir)
    if env.is_main:
        for name in (CHECKPOINT_NAME, "model.pt"):  # what a killed writer may have left
            remove_stale_temporaries(output_dir / name)
    resume_from = _resume_path(cfg.trainer.resume, output_dir)
    _cpu_precision(cfg, env)
    torch.manual_seed(cfg.trainer.seed)
    dataset = instantiate(cfg.dataset.train)
    _count_classes(cfg, dataset)
    pair_sets = selected_pair_sets(OmegaConf.select(cfg, "dataset.val"), hydra_cfg.overrides.task)
    verifies = cfg.trainer.verify_at_start or cfg.trainer.verify_at_end or cfg.trainer.verify_every > 0
    # Pair sets cost time to load or render: only rank 0 verifies, and only when a verification is switched on.
    val_sets = {name: instantiate(node) for name, node in pair_sets.items()} if env.is_main and verifies else {}
    backbone = instantiate(cfg.backbone).to(env.device)
    head = instantiate(cfg.pfc, margin=instantiate(cfg.margin)).to(env.device)
    optimizer = build_optimizer(instantiate(cfg.optimizer), backbone, head)
    loader = build_loader(dataset, cfg.trainer.batch_size, rank=env.rank, world_size=env.world_size,
                          seed=cfg.trainer.seed, num_workers=cfg.trainer.num_workers, device=env.device,
                          loader=OmegaConf.select(cfg, "dataset.loader", default="torch"))
    warmup, total = _total_steps(cfg, len(dataset), env.world_size, len(loader))
    schedule = instantiate(cfg.scheduler, warmup_steps=warmup, total_steps=total)
    tracker = instantiate(cfg.tracking) if env.is_main else NullTracker()
    trainer = Trainer(backbone, head, optimizer, loader, schedule, env=env, output_dir=output_dir,
                      options=trainer_options(cfg), val_sets=val_sets, tracker=tracker, stop_request=stop_request,
                      backbone_name=cfg.backbone.name)
    stop_request.on_second_signal = lambda: f"; {trainer.last_checkpoint_note()}"
    # Initialisation above is identical on every rank; augmentation must differ between ranks.
    torch.manual_seed(cfg.trainer.seed + env.rank)
    if resume_from is not None:
        trainer.resume(resume_from)  # restores the random streams too, where the world size is unchanged
    tracker.start(settings(cfg), run_id=trainer.tracking_run_id,
                  tags={"backbone": cfg.backbone.name, "dataset": cfg.dataset.name, "world_size": env.world_size,
                        **job_tags()})
    try:
        tracker.log_artifacts(output_dir / ".hydra", artifact_path="hydra")
        log.info("training %s (%s) on %s (%d images, %d classes) for %d step(s) on %d %s process(es); outputs in %s",
                 cfg.backbone.name, _how(cfg, backbone), cfg.dataset.name, len(dataset), cfg.dataset.num_classes,
                 total, env.world_size, env.device.type, output_dir)
        results = trainer.fit()
    except BaseException as exc:
        tracker.set_tags({"arcface.failure": str(_user_error(exc) or repr(exc))[:5000]})
        tracker.end("FAILED")
        raise
    if trainer.stopped_by is not None:
        command = _resume_command(output_dir)
        tracker.set_tags({"arcface.stopped_at_step": trainer.step, "arcface.resume_command": command})
        tracker.end("KILLED")  # continued by the resumed job, which reopens this run
        # Only submitit's own signal requeues (SLURM's warning before a time limit, or before the end of a
        # preemption's grace time): a SIGTERM is scancel, or SLURM's final word after that warning.
        sig = requeue_signal()
        requeue_handler = (submitit_requeue_handler(stop_request.previous_handler(sig))
                           if stop_request.signal_name == sig.name else None)
        if env.is_main:
            then = ("submitit requeues the job, which resumes by itself" if requeue_handler is not None
                    else f"resume with: {command}")
            print(f"stopped by {trainer.stopped_by} at step {trainer.step}/{trainer.total_steps} with its state "
                  f"saved in {output_dir / CHECKPOINT_NAME}; {then}", file=sys.stderr, flush=True)
        if requeue_handler is not None:
            _requeue_or_fail(cfg, requeue_handler, tracker.run_id)
        return trainer.stopped_by
    for name, accs in results.items():
        if "final" in accs:  # trainer.verify_at_end
            before = f"random-init accuracy {accs['initial']:.4f} -> " if "initial" in accs else ""
            log.info("verification %s: %strained accuracy %.4f", name, before, accs["final"])
    tracker.end()
    return None


def _requeue_or_fail(cfg: DictConfig, handler, run_id: str | None) -> None:
    """Hand the stop to submitit, which requeues the job (SystemExit); when it refuses (requeues used up), the
    run's MLflow run ends FAILED with submitit's reason and the job fails with it."""
    try:
        requeue(handler)
    except Exception as refusal:
        if run_id is not None:  # rank 0's run; the other ranks track nothing
            closing = instantiate(cfg.tracking)
            closing.start({}, tags={"arcface.failure": str(refusal)}, run_id=run_id)
            closing.end("FAILED")
        raise


# An absolute path: relative ones are read as a Python package when started through the console script.
CONF_DIR = str(Path(__file__).resolve().parent.parent / "conf")


register_resolvers()  # before Hydra composes: conf/train.yaml uses them


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="train")
def _main(cfg: DictConfig) -> None:
    with StopRequest() as stop_request:
        try:
            stopped_by = train(cfg, stop_request)
        except Exception as exc:
            error = _user_error(exc)
            if error is None:
                raise
            exit_with_error(error)
        finally:
            shutdown_distributed()
    if stopped_by is not None:
        sys.exit(EXIT_STOPPED)


def main() -> None:
    """`arcface-train`: an option of a config group that names no file stops with one sentence; Hydra does the
    rest."""
    try:
        check_group_choices(sys.argv[1:], Path(CONF_DIR))
    except UserError as error:
        exit_with_error(error)
    _main()


if __name__ == "__main__":
    main()
