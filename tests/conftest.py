"""Fixtures; the helpers they use, and that test modules import, are in helpers.py."""

import os

import numpy as np
import pytest
import torch

from helpers import (fitnets, make_config as compose_config, tiny_overrides, tiny_teacher, write_cifar, write_svhn,
                     write_tiny_mnist)


def pytest_configure(config):
    # One thread, here and in every `fitnets` subprocess: tiny models gain nothing from more, and beside
    # another job on a 2-core CPU OpenMP's spinning threads made a 7-second training run take 2 minutes.
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session", autouse=True)
def outside_the_checkout(tmp_path_factory):
    """Run every test from a scratch directory: commands without hydra.run.dir write runs/<command>/<time>
    into the current directory, which must not be the checkout."""
    here = os.getcwd()
    os.chdir(tmp_path_factory.mktemp("cwd"))
    yield
    os.chdir(here)


@pytest.fixture
def make_config():
    """Compose a command's real config with overrides, as the CLI does, into typed dataclasses."""
    return compose_config


@pytest.fixture
def tiny_mnist(tmp_path):
    """A data root with tiny MNIST files in the official IDX layout: 20 train and 5 test images per class."""
    return write_tiny_mnist(tmp_path / "data")


@pytest.fixture
def tiny(tiny_mnist, tmp_path):
    """Overrides that make every command run on the tiny MNIST files in seconds."""
    return tiny_overrides(tiny_mnist, tmp_path / "teachers") + ["recipe.student.max_epochs=2"]


@pytest.fixture(scope="session")
def teacher(tmp_path_factory):
    """(root, overrides): tiny MNIST in root/data and a teacher trained on it once for the whole session, run
    in root/teacher and stored in root/teachers. Tests must not write under root: runs go elsewhere."""
    root = tmp_path_factory.mktemp("teacher")
    return root, tiny_teacher(root)


@pytest.fixture(scope="session")
def fitnet(teacher, tmp_path_factory):
    """(run directory, stdout): the MNIST FitNet trained with hints + KD, 2 epochs a stage, on the shared teacher."""
    _, base = teacher
    run = tmp_path_factory.mktemp("fitnet") / "run"
    out = fitnets("train", *base, "student=fitnet_mnist", "recipe.student.max_epochs=2", f"hydra.run.dir={run}").stdout
    return run, out


@pytest.fixture(scope="session")
def tiny_datasets(tmp_path_factory):
    """A data root per dataset: CIFAR-10 and CIFAR-100 with 20 training and 10 test images, and tiny SVHN.
    Shared, so the tests that whiten CIFAR share the whitening cache (a 3072 x 3072 eigendecomposition)."""
    root = tmp_path_factory.mktemp("datasets")
    rng = np.random.default_rng(0)
    for name in ("cifar10", "cifar100"):
        write_cifar(root / name, name, 20, 10, rng)
    (root / "svhn").mkdir()
    write_svhn(root / "svhn", rng)
    return {name: root / name for name in ("cifar10", "cifar100", "svhn")}
