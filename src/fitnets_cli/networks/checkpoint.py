"""Saved models: a checkpoint carries how to build its network again and the config that trained it, so it
rebuilds on its own."""

from dataclasses import asdict
from pathlib import Path

import torch
from omegaconf import OmegaConf

from fitnets_cli.config.errors import ConfigError
from fitnets_cli.config.groups import Dataset
from fitnets_cli.networks.build import build_network, network_of
from fitnets_cli.runtime.files import atomic_write

FORMAT = "fitnets-checkpoint-2"
FORMATS = ("fitnets-checkpoint-1", FORMAT)   # 1: the paper's maxout networks only, their specs under "layers"


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
