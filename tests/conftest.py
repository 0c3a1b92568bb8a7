import os
import struct
import subprocess
import sys
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


def fitnets(*args, cwd=None, check=True):
    """Run the real `fitnets` entry point in a subprocess."""
    env = {**os.environ, "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "fitnets_cli", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"fitnets {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture
def tiny_mnist(tmp_path):
    """A data root with tiny MNIST files in the official IDX layout: 20 train and 5 test images per class."""
    return write_tiny_mnist(tmp_path / "data")


def tiny_overrides(data: Path, store: Path) -> list[str]:
    """Overrides that make a command run on the tiny MNIST files under `data` in seconds."""
    return ["dataset=mnist", f"data.root={data}", "dataset.valid_size=50", f"teacher_store={store}",
            "recipe.teacher.max_epochs=2", "recipe.teacher.optimizer=rmsprop", "recipe.teacher.lr=0.002",
            "recipe.teacher.momentum=0", "recipe.teacher.momentum_final=0", "device=cpu"]


@pytest.fixture
def tiny(tiny_mnist, tmp_path):
    """Overrides that make every command run on the tiny MNIST files in seconds."""
    return tiny_overrides(tiny_mnist, tmp_path / "teachers") + ["recipe.student.max_epochs=2"]


def tiny_teacher(root: Path) -> list[str]:
    """Tiny MNIST under root, a teacher trained on it, and the overrides that run on both."""
    base = tiny_overrides(write_tiny_mnist(root / "data"), root / "teachers")
    fitnets("train-teacher", *base, f"hydra.run.dir={root / 'teacher'}")
    return base


def write_tiny_mnist(root: Path) -> Path:
    """Write 20 train and 5 test images per class as MNIST's raw IDX files under root/MNIST/raw."""
    rng = np.random.default_rng(0)
    raw = root / "MNIST" / "raw"
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
    return root
