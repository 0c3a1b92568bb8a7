"""What several test modules share: the real CLI in a subprocess, tiny datasets in each official format,
and a small in-memory training session. Fixtures live in conftest.py."""

import contextlib
import io
import os
import pickle
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from hydra import compose, initialize_config_module
from torch.utils.tensorboard import SummaryWriter

from fitnets_cli import cli
import fitnets_cli.networks.zoo  # noqa: F401  (registers the zoo's networks as config options)
from fitnets_cli.config.commands import to_config
from fitnets_cli.data.splits import Resident, Splits
from fitnets_cli.networks.maxout import build_net
from fitnets_cli.training.loop import Run, train_stage
from fitnets_cli.training.resume import Progress
from fitnets_cli.training.stages import Session, plan_stages, session


def make_config(config_name: str = "train", overrides=()):
    """Compose a command's real config with overrides, as the CLI does, into typed dataclasses."""
    with initialize_config_module("fitnets_cli.conf", version_base="1.3"):
        return to_config(compose(config_name, overrides=list(overrides)))


def fitnets(*args, cwd=None, check=True):
    """Run the real `fitnets` entry point in a subprocess."""
    proc = subprocess.run([sys.executable, "-m", "fitnets_cli", *map(str, args)], cwd=cwd,
                          env={**os.environ, "COLUMNS": "200"}, capture_output=True, text=True, timeout=600)
    if check and proc.returncode != 0:
        raise AssertionError(f"fitnets {' '.join(map(str, args))} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def call(*args, check=True, md5=True) -> subprocess.CompletedProcess:
    """Run `fitnets *args` through the entry point's main() in this process; return its exit code, stdout and
    stderr as a subprocess would. A subprocess spends seconds importing torch: only tests that need a real
    process (signals, torchrun, the installed entry point) use `fitnets`. md5=False switches torchvision's MD5
    check of CIFAR and SVHN files off, so that tiny files, whose sums cannot match the real ones, are read."""
    out, err, code = io.StringIO(), io.StringIO(), 0
    with pytest.MonkeyPatch.context() as patch, contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        patch.setattr(sys, "argv", ["fitnets", *map(str, args)])
        if not md5:
            import torchvision.datasets.cifar
            import torchvision.datasets.svhn
            patch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
            patch.setattr(torchvision.datasets.svhn, "check_integrity", lambda *args: True)
        try:
            cli.main()
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    proc = subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())
    if check and code != 0:
        raise AssertionError(f"fitnets {' '.join(map(str, args))} exited with {code}:\n{proc.stdout}\n{proc.stderr}")
    return proc


def main(*args) -> str:
    """Run `fitnets *args` in this process (see `call`), which must succeed, and return what it printed."""
    return call(*args).stdout


def failure(*args, md5=True) -> str:
    """Run `fitnets *args` in this process (see `call`), which must exit with code 2 after one line on stderr
    and no traceback, and return that line."""
    proc = call(*args, check=False, md5=md5)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "Traceback" not in proc.stdout + proc.stderr, proc.stderr
    return lines[0]


def start(*args, cwd=None, command=("-m", "fitnets_cli")) -> subprocess.Popen:
    """Start the real `fitnets` entry point (or `command`, a python command line) without waiting for it."""
    return subprocess.Popen([sys.executable, *command, *map(str, args)], cwd=cwd, env={**os.environ, "COLUMNS": "200"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def signal_when(proc: subprocess.Popen, last: Path, condition, sig, timeout: float = 300) -> None:
    """Send `sig` to `proc` as soon as its resume checkpoint `last` holds a state for which condition(state)."""
    seen, deadline = None, time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        try:
            st = last.stat()
            stamp = st.st_ino, st.st_mtime_ns
        except FileNotFoundError:
            stamp = None
        # Each checkpoint is loaded once: polling must not take the CPU from the run it watches. Checkpoints
        # are renamed into place complete, so a load never sees half a file.
        if stamp is not None and stamp != seen:
            seen = stamp
            if condition(torch.load(last, weights_only=True)):
                proc.send_signal(sig)
                return
        time.sleep(0.005)


def without_timing(history: list[dict]) -> list[dict]:
    """Epoch records less their timings (seconds, images/s, data-wait share), which differ between otherwise
    identical runs."""
    return [{k: v for k, v in h.items() if k not in ("epoch_s", "images_s", "data_wait")} for h in history]


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write an array in MNIST's IDX format (big-endian dims after a magic of dtype 0x08 and ndim)."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


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


def tiny_overrides(data: Path, store: Path) -> list[str]:
    """Overrides that make a command run on the tiny MNIST files under `data` in seconds."""
    return ["dataset=mnist", f"data.root={data}", "dataset.valid_size=50", f"teacher_store={store}",
            "recipe.teacher.max_epochs=2", "recipe.teacher.optimizer=rmsprop", "recipe.teacher.lr=0.002",
            "recipe.teacher.momentum=0", "recipe.teacher.momentum_final=0", "device=cpu"]


def tiny_teacher(root: Path) -> list[str]:
    """Tiny MNIST under root, a teacher trained on it (run dir root/teacher), and the overrides that run on both."""
    base = tiny_overrides(write_tiny_mnist(root / "data"), root / "teachers")
    fitnets("train-teacher", *base, f"hydra.run.dir={root / 'teacher'}")
    return base


def write_cifar(root: Path, name: str, train: int, test: int, rng) -> Path:
    """CIFAR-10 or CIFAR-100 as torchvision reads them, pickled batches in their folder under root: `train`
    and `test` images whose labels cycle through the classes (CIFAR-10's training set in 5 batches)."""
    classes, folder, label_key = {"cifar10": (10, "cifar-10-batches-py", "labels"),
                                  "cifar100": (100, "cifar-100-python", "fine_labels")}[name]
    d = root / folder
    d.mkdir(parents=True)

    def batch(n, first=0):
        return {"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                label_key: [(first + i) % classes for i in range(n)]}

    if name == "cifar10":
        files = {f"data_batch_{i + 1}": batch(train // 5, i * (train // 5)) for i in range(5)}
        files.update(test_batch=batch(test), **{"batches.meta": {"label_names": [str(i) for i in range(10)]}})
    else:
        files = {"train": batch(train), "test": batch(test), "meta": {"fine_label_names": [str(i) for i in range(100)]}}
    for fname, obj in files.items():
        with open(d / fname, "wb") as f:
            pickle.dump(obj, f)
    return d


def write_svhn(root: Path, rng) -> None:
    """SVHN's train, test and extra .mat files under root: 4, 2 and 3 images per class."""
    for split, per_class in (("train", 4), ("test", 2), ("extra", 3)):
        labels = np.repeat(np.arange(1, 11), per_class)       # SVHN stores digit 0 as label 10
        scipy.io.savemat(root / f"{split}_32x32.mat",
                         {"X": rng.integers(0, 256, (32, 32, 3, len(labels)), dtype=np.uint8), "y": labels[:, None]})


def mnist_session(make_config, tmp_path: Path, overrides=()):
    """A run without a directory or data, a session of the MNIST FitNet with an untrained MNIST teacher, and the
    planned stages of its schedule (default: fitnets, [hint, kd]); `make_config` composes the config (the
    fixture of that name, or the function here)."""
    cfg = make_config("train", ["dataset=mnist", "student=fitnet_mnist", *overrides])
    torch.manual_seed(0)
    teacher = build_net(cfg.teacher.layers, (1, 28, 28), 10, init_range=0.05).eval().requires_grad_(False)
    student = build_net(cfg.student.layers, (1, 28, 28), 10, init_range=0.05)
    stages = plan_stages(cfg, teacher, student)
    return tiny_run(cfg, tmp_path), session(student, teacher, stages, torch.device("cpu")), stages


def tiny_run(cfg, tmp_path: Path, device=torch.device("cpu")) -> Run:
    """A run of `cfg`'s student recipe that keeps no checkpoint and has no test split; TensorBoard in tmp_path."""
    return Run(cfg, cfg.recipe.student, device, Splits(None, None, None), None, SummaryWriter(tmp_path))


def train_stages(run: Run, s: Session, stages, train, valid, epochs: list[int]) -> list[dict]:
    """Train the stages one after another for the given epochs, as loop.fit does in one phase; their results."""
    progress = Progress()
    return [train_stage(run, s, stage, train, valid, n, progress) for stage, n in zip(stages, epochs)]


def stage_of(state: dict) -> int:
    """The stage (0-based) that a resume checkpoint stopped in or before."""
    return len(state["progress"]["results"])


def in_stage(state: dict) -> dict | None:
    """The progress in a resume checkpoint written inside a stage; None for one written at a stage boundary."""
    progress = state["progress"]
    return progress if progress["optimizer"] is not None else None


def random_split(n: int, seed: int) -> Resident:
    """A split of n random MNIST-shaped images and labels, drawn from `seed`."""
    g = torch.Generator().manual_seed(seed)
    return Resident(torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))


def write_image_folder(root: Path, classes: int = 3, per_class=(8, 4), sizes=((12, 12), (16, 16))) -> Path:
    """Tiny RGB images in torchvision's ImageFolder layout, root/train/<class>/ and root/val/<class>/ with
    `per_class` images each, alternately PNG at the first size and JPEG at the second; class c is brightest in
    channel c, so that it can be learnt."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in zip(("train", "val"), per_class):
        for c in range(classes):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for i in range(n):
                w, h = sizes[i % 2]
                pixels = rng.integers(0, 80, (h, w, 3), dtype=np.uint8)
                pixels[..., c % 3] += 150
                Image.fromarray(pixels).save(folder / f"{i}.{'png' if i % 2 == 0 else 'jpg'}")
    return root


class TinyNet(torch.nn.Module):
    """A user's own small network, for student=module student._target_=helpers.TinyNet: two conv blocks and a
    linear head, no batch norm (so that ranks and one process train alike)."""

    def __init__(self, num_classes: int = 10, width: int = 8, channels: int = 3):
        super().__init__()
        nn = torch.nn
        self.block1 = nn.Sequential(nn.Conv2d(channels, width, 3, padding=1), nn.ReLU())
        self.block2 = nn.Sequential(nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(2 * width, num_classes))

    def forward(self, x):
        return self.head(self.block2(self.block1(x)))
