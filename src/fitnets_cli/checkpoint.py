"""Saved models: a checkpoint carries how to build its network again and the config that trained it, so it
rebuilds on its own. Every output is written to a temporary file and renamed, so a crash never leaves a
half-written file."""

import errno
import json
import os
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import OmegaConf

from fitnets_cli import dist
from fitnets_cli.config import ConfigError, Dataset
from fitnets_cli.networks import build_network, network_of

FORMAT = "fitnets-checkpoint-2"
FORMATS = ("fitnets-checkpoint-1", FORMAT)   # 1: the paper's maxout networks only, their specs under "layers"


class DiskFull(ConfigError):
    """A write ran out of space (or quota): reported as one line, like bad input."""


FULL = (errno.ENOSPC, errno.EDQUOT)


def out_of_space(err: BaseException, folder: Path) -> bool:
    """Whether a failed write ran out of space: ENOSPC or EDQUOT anywhere in the exception chain or, since
    torch's file writer drops the errno ("unexpected pos ..."), under 1 MiB left in `folder` after the failure."""
    cause = err
    while cause is not None:
        if isinstance(cause, OSError) and cause.errno in FULL:
            return True
        cause = cause.__cause__ or cause.__context__
    return isinstance(err, (OSError, RuntimeError)) and shutil.disk_usage(folder).free < 2**20


def _size(n: int) -> str:
    for scale, unit in ((2**30, "GiB"), (2**20, "MiB"), (2**10, "KiB")):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} bytes"


def atomic_write(path: Path, write) -> None:
    """Call write(tmp_path) on a fresh temporary file beside `path`, flush it to disk, rename it over `path`.
    Under torchrun only rank 0 writes: every output of fitnets goes through here. A full disk raises DiskFull
    and leaves any earlier `path` as it was."""
    if not dist.is_main():
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        return
    except Exception as err:
        if not out_of_space(err, path.parent):   # checked while the partial file still fills the disk
            raise
        written = tmp.stat().st_size if tmp.exists() else 0
    finally:
        tmp.unlink(missing_ok=True)
    # Measured once the failed writer has let go of the partial file, so its space counts as free.
    free = _size(shutil.disk_usage(path.parent).free)
    needs = f", and it needs more than {_size(written)}" if written else ""
    raise DiskFull(f"the disk is full: could not write {path} ({free} free there{needs}); free some space there "
                   "or write elsewhere; files written before are intact")


def write_text(path: Path, text: str) -> None:
    """Write a text file atomically."""
    atomic_write(path, lambda tmp: tmp.write_text(text))


def write_json(path: Path, obj) -> None:
    """Write `obj` as indented JSON, atomically."""
    write_text(path, json.dumps(obj, indent=2) + "\n")


def save_model(path: Path, net, *, role: str, name: str, dataset: Dataset, config: str, metrics: dict,
               provenance: dict):
    """Save a teacher or student with everything needed to rebuild and evaluate it, and what made it."""
    payload = {
        "format": FORMAT, "role": role, "name": name,
        "dataset": asdict(dataset), "in_shape": list(net.in_shape), "num_classes": net.num_classes,
        "network": net.build_spec, "state_dict": net.state_dict(),
        "config": config, "metrics": metrics, "provenance": provenance,
    }
    atomic_write(path, lambda tmp: torch.save(payload, tmp))


def load_payload(path) -> dict:
    """Read a checkpoint file, with a one-line error when it is missing, truncated or not ours."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types for truncated or foreign files
        raise ConfigError(f"checkpoint {path} is corrupted or not a fitnets checkpoint "
                          f"({str(err).splitlines()[0][:120]})") from None
    if not isinstance(payload, dict) or payload.get("format") not in FORMATS:
        raise ConfigError(f"{path} is not a fitnets checkpoint (expected format {FORMAT}); for a plain "
                          "state_dict trained elsewhere, use teacher.weights=PATH")
    if "network" not in payload:
        payload["network"] = {"name": payload["name"], "layers": payload["layers"], "arch": None,
                              "_target_": None, "kwargs": {}}
    return payload


def load_model(path, device):
    """Rebuild the saved network, load its weights, and return it with the checkpoint's payload."""
    payload = load_payload(path)
    net = build_network(network_of(payload["network"]), payload["in_shape"], payload["num_classes"])
    net.load_state_dict(payload["state_dict"])
    return net.to(device), payload


def saved_dataset(payload) -> Dataset:
    """The dataset config a checkpoint was trained with."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(Dataset), payload["dataset"]))


def holds(run_dir: Path) -> str | None:
    """What an output directory already holds that must not be trained over, if anything."""
    if (run_dir / "metrics.json").exists():
        return "a finished run, which is never overwritten"
    if (run_dir / "checkpoints" / "last.pt").exists():
        return "an interrupted run"
    return None
