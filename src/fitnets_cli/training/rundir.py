"""What a run leaves behind: its directory (the resolved config first, metrics.json last), the saved model,
TensorBoard logs and the provenance of what made it."""

import hashlib
import json
import os
import platform
import subprocess
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
from omegaconf import OmegaConf
from rich.table import Table
from torch.utils.tensorboard import SummaryWriter

from fitnets_cli.config.commands import SCHEMAS, TrainingConfig
from fitnets_cli.config.errors import ConfigError
from fitnets_cli.networks.build import count
from fitnets_cli.networks.checkpoint import save_model
from fitnets_cli.runtime import dist
from fitnets_cli.runtime.files import write_json, write_text
from fitnets_cli.runtime.ui import console
from fitnets_cli.training import resume
from fitnets_cli.training.evaluate import evaluate
from fitnets_cli.training.stages import Session


class AlreadyFinished(Exception):
    """resume= named a finished run: nothing to do."""


def prepare(cfg: TrainingConfig, run_dir: Path | None,
            continues: bool = False) -> tuple[TrainingConfig, Path, dict | None]:
    """The run's config, directory and resumable state: with resume=DIR, the saved config and state of DIR;
    else a new run in run_dir, or, `continues`, an auto-trained teacher's, which goes on where its student's
    run stopped."""
    if cfg.resume:
        run_dir = Path(cfg.resume)
        saved = run_dir / "config_resolved.yaml"
        if not saved.exists():
            raise ConfigError(f"resume={run_dir}: no config_resolved.yaml there; is it a fitnets run directory?")
        resumed = OmegaConf.load(saved)
        if resumed.get("command") != cfg.command:
            raise ConfigError(f"{run_dir} is a `fitnets {resumed.get('command')}` run; resume it with "
                              f"`fitnets {resumed.get('command')} resume={run_dir}`")
        resumed = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(SCHEMAS[cfg.command]), resumed))
        if (run_dir / "metrics.json").exists():
            acc = json.loads((run_dir / "metrics.json").read_text())["test"]["acc"]
            raise AlreadyFinished(f"{run_dir} already finished (test accuracy {acc:.2%}); nothing to resume")
        cfg = resumed
        state = resume.load(run_dir)
        at = state and state["progress"]
        console.print(f"resuming {run_dir} " + ("from its start (no checkpoint yet)" if state is None else
                      f"at stage {len(at['results']) + 1} of phase {at['phase']}"))
    else:
        state = resume.load(run_dir) if continues else None
        write_text(run_dir / "config_resolved.yaml", OmegaConf.to_yaml(OmegaConf.structured(cfg)))
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(cfg.deterministic)
    return cfg, run_dir, state


def provenance(cfg: TrainingConfig, teacher_file: Path | None = None) -> dict:
    """What made a model: package versions, the code's git commit, the teacher file's hash, the split seed."""
    here = Path(__file__).resolve().parent
    try:
        top, commit = subprocess.run(["git", "rev-parse", "--show-toplevel", "HEAD"], cwd=here, capture_output=True,
                                     text=True, timeout=10).stdout.split() or (None, None)
    except (OSError, subprocess.SubprocessError, ValueError):
        top, commit = None, None
    if top is None or Path(top) / "src" / "fitnets_cli" != here:
        commit = None   # installed outside a fitnets checkout: no commit to record
    teacher_sha = hashlib.sha256(teacher_file.read_bytes()).hexdigest() if teacher_file else None
    packages = ("fitnets-cli", "torch", "torchvision", "timm", "hydra-core", "omegaconf")
    return {"versions": {p: installed_version(p) for p in packages}
            | {"python": platform.python_version()},
            "git_commit": commit, "teacher_sha256": teacher_sha, "split_seed": cfg.data.split_seed, "seed": cfg.seed}


def installed_version(package: str) -> str | None:
    """The package's installed version; None when it runs from a source tree that was never installed."""
    try:
        return version(package)
    except PackageNotFoundError:
        return None


def finish(run, s: Session, result: dict, role: str, name: str, started: float, made_by: dict,
           store: Path | None = None) -> dict:
    """Test the final model, save it, write metrics.json (last: it marks the run finished) and TensorBoard
    hparams, and print the summary; return the metrics."""
    cfg, data, run_dir, net = run.cfg, run.data, run.dir, s.net
    test = evaluate(net, data.test, cfg.eval_batch_size)
    last_stage = (result.get("retrain") or result["stages"])[-1]
    sizes = count(net, cfg.counting)
    metrics = {
        "command": cfg.command, "role": role, "model": name, "dataset": cfg.dataset.name,
        "teacher": cfg.teacher.name if cfg.teacher else None,
        "schedule": "teacher" if role == "teacher" else cfg.schedule.name, "seed": cfg.seed,
        "counting": cfg.counting, **sizes, "test": test, "test_last": last_stage["test_last"] or test,
        "device": str(run.device), "provenance": made_by,
        "wall_s": round(time.time() - started, 1), **result,
    }
    skipped = sorted(set().union(*(getattr(split, "skipped", ()) for split in (data.train, data.valid, data.test))))
    if skipped:   # data.bad_images=skip
        metrics["skipped_images"] = skipped
        console.print(f"{len(skipped)} image(s) failed to decode and were left out (data.bad_images=skip): "
                      f"{', '.join(skipped[:3])}{', ...' if len(skipped) > 3 else ''}")
    for path in [run_dir / "checkpoints" / f"{role}.pt"] + ([store] if store else []):
        save_model(path, net, role=role, name=name, dataset=cfg.dataset,
                   config=(run_dir / "config_resolved.yaml").read_text(), metrics=test, provenance=made_by)
    if store:
        console.print(f"teacher stored at {store}")
    write_json(run_dir / "metrics.json", metrics)
    dist.barrier()   # an auto-trained teacher is read back by every rank once rank 0 has stored it
    run.tb.add_hparams({"model": name, "dataset": cfg.dataset.name, "schedule": metrics["schedule"],
                        "seed": cfg.seed, "lr": run.optim.lr, "batch_size": run.optim.batch_size},
                       {"hparam/test_acc": test["acc"], "hparam/test_loss": test["loss"]}, run_name=".")
    run.tb.close()
    table = Table(title=f"{role} {name} on {cfg.dataset.name}")
    for col in ("stage", "epochs", "best epoch", "best valid"):
        table.add_column(col)
    for r in result["stages"] + result.get("retrain", []):
        table.add_row(r["name"], str(r["epochs"]), str(r["best_epoch"]),
                      "" if r["best_valid"] is None else f"{r['best_valid']:.4g}")
    console.print(table)
    console.print(f"test accuracy {test['acc']:.2%} (error {test['error']:.2%}, loss {test['loss']:.4f}); "
                  f"{sizes['params']:,} params, {sizes['mults']:,} mults; run dir {run_dir}")
    return metrics


class Unlogged:
    """The TensorBoard writer of torchrun's ranks other than 0: it writes nothing."""

    def __getattr__(self, name):
        return lambda *args, **kwargs: None


def tensorboard(run_dir: Path, state: dict | None) -> SummaryWriter:
    """The run's TensorBoard writer; on resume, points logged after the checkpoint are dropped."""
    if not dist.is_main():
        return Unlogged()
    return SummaryWriter(run_dir / "tb", purge_step=state["progress"]["step"] if state else None)


def holds(run_dir: Path) -> str | None:
    """What an output directory already holds that must not be trained over, if anything."""
    if (run_dir / "metrics.json").exists():
        return "a finished run, which is never overwritten"
    if (run_dir / "checkpoints" / "last.pt").exists():
        return "an interrupted run"
    return None
