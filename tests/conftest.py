import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_module

from fitnets_cli.config import to_config


@pytest.fixture
def make_config():
    """Compose a command's real config with overrides, as the CLI does, into typed dataclasses."""
    def make(config_name: str = "train", overrides=()):
        with initialize_config_module("fitnets_cli.conf", version_base="1.3"):
            return to_config(compose(config_name, overrides=list(overrides)))
    return make


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an array in MNIST's IDX format (big-endian dims after a magic of dtype 0x08 and ndim)."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.fixture
def tiny_mnist(tmp_path):
    """A data root with tiny MNIST files in the official IDX layout: 20 train and 5 test images per class."""
    rng = np.random.default_rng(0)
    raw = tmp_path / "data" / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, per_class in (("train", 20), ("t10k", 5)):
        labels = np.repeat(np.arange(10), per_class)
        rng.shuffle(labels)
        # A learnable signal: each class lights up its own row band.
        images = rng.integers(0, 60, size=(len(labels), 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 + 2 * c: 4 + 2 * c, 4:24] = 255
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return tmp_path / "data"
