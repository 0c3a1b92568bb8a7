"""Training throughput, in one process and one run, as ratios (the machine may be shared and noisy):

  (a) floor        the bare model step (forward, backward, optimiser) on one pre-made batch
  (b) ours         fitnets' own training loop (loop.train_stage, as the CLI runs it) on device-resident data
  (c) conventional a dataset that decodes each uint8 image to PIL as torchvision's CIFAR10/MNIST do, a
                   DataLoader with per-sample transforms, a full teacher forward and a `.item()` every
                   step, as the popular KD repositories do

Each is warmed up for `steps` steps and timed over the next 2 x `steps`.

for stage 1 (hints) and stage 2 (KD) of FitNet-4 with the maxout teacher at CIFAR-10 shape, of the MNIST
FitNet with the MNIST maxout teacher, and of resnet8x4 with resnet32x4 on the CRD benchmark's CIFAR-100
recipe (experiment=crd_cifar100). Each pair trains with its recipe's optimiser, in all three loops. Prints
images/s, b/a and b/c, and peak memory.

The streaming case (`--only streaming`) trains a torchvision ResNet-18 by backprop on a folder of JPEGs
(random-resized crops of 32x32 and flips, batch 64) through

  (d) ours         fitnets' streaming path (loader workers decode and crop into uint8 tensors, flips on the
                   device) feeding the same loop.train_stage
  (e) conventional torchvision's ImageFolder with RandomResizedCrop, RandomHorizontalFlip and ToTensor in a
                   DataLoader, the same model step in a plain loop

with --workers loader workers each, timed over the second of two epochs; prints images/s and the share of
that time spent waiting for data.

  python scripts/bench.py [--steps 4] [--batch 128] [--device cpu] [--amp on|off|both] [--compile]
                          [--channels-last on|off|both|preset] [--only NAME] [--json bench.json]
  python scripts/bench.py --only streaming [--images 4000] [--workers 2]

--amp, --compile and --channels-last set the CLI's `amp`, `compile` and `channels_last` options (the floor and
conventional steps use the same networks, under the same autocast).
--amp both measures each stage in fp32 and in bf16 and prints the speed-up of our loop (b) under bf16;
--channels-last both, in both memory layouts and the speed-up of channels_last.
"""

import argparse
import json
import platform
import resource
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
from PIL import Image
from rich.console import Console
from rich.table import Table
from torch.utils.tensorboard import SummaryWriter

from fitnets_cli import api
from fitnets_cli.data.load import load_data
from fitnets_cli.data.splits import Resident
from fitnets_cli.data.splits import Splits
from fitnets_cli.networks.build import build_network
from fitnets_cli.runtime.dist import pick_device
from fitnets_cli.training.evaluate import evaluate
from fitnets_cli.training.hints import key as regressor_key
from fitnets_cli.training.loop import Run, augmentation, make_optimizer, train_stage
from fitnets_cli.training.losses import hint_loss, kd_soft
from fitnets_cli.training.resume import Progress
from fitnets_cli.training.stages import Session, autocast, backprop_stage, plan_stages, session, trained_modules
from fitnets_cli.training.train import maybe_compile

PAIRS = {  # name -> config overrides, the dataset image shape, and its CIFAR-10-sized training set
    "fitnet4/maxout CIFAR-10": (["dataset=cifar10", "student=fitnet4"], (3, 32, 32), 50_000),
    "fitnet_mnist/maxout MNIST": (["dataset=mnist", "student=fitnet_mnist"], (1, 28, 28), 50_000),
    "resnet8x4/resnet32x4 CIFAR-100": (["experiment=crd_cifar100", "pair=resnet32x4-resnet8x4"], (3, 32, 32), 50_000),
}
LAM = 4.0   # the KD weight of the (a) and (c) steps: lam at the start of stage 2, where (b) is timed


def setup(overrides, device, tb_dir):
    """A run of the real config (no directory, no data), a session of a frozen teacher and the student, and
    its planned stages (hints, then KD), for one model pair."""
    cfg = api.compose("train", overrides)
    shape, classes = cfg.dataset.in_shape, cfg.dataset.num_classes
    teacher = build_network(cfg.teacher, shape, classes, 0.05).to(device).eval().requires_grad_(False)
    student = build_network(cfg.student, shape, classes, cfg.recipe.student.init_range).to(device)
    stages = plan_stages(cfg, teacher, student)
    teacher, student = maybe_compile(teacher, cfg), maybe_compile(student, cfg)
    run = Run(cfg, cfg.recipe.student, device, Splits(None, None, None), None, SummaryWriter(tb_dir))
    return run, session(student, teacher, stages, device), stages


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def method_loss(cfg, s, plan, t, out, y):
    """The stage's loss from the teacher's and the student's outputs (`plan`: the hint stage's pair, else KD)."""
    if plan:
        guided, name = out[plan.guided], regressor_key(plan.guided)
        pred = s.regressors[name](guided) if name in s.regressors else guided
        return 1.0 * hint_loss(t[plan.hint], pred, cfg.hints.reduction)
    kd = cfg.recipe.kd
    return kd.ce_weight * F.cross_entropy(out[None].float(), y) + LAM * kd_soft(out[None], t[None], kd.tau, kd.form)


def floor_loss(cfg, s, stage, x, y):
    """The bare step's loss: the teacher and the student as deep as the stage needs, the loss; nothing else."""
    plan = stage.plans[0] if stage.guided else None
    tap = plan.guided if plan else None
    with torch.no_grad():
        t = s.teacher.taps(x, [plan.hint if plan else None])
    return method_loss(cfg, s, plan, t, s.net.taps(x, [tap]), y)


def floor_step(run, s, stage, x, y, opt):
    """One bare step: floor_loss, backward, optimiser."""
    with autocast(run.cfg, run.device):
        loss = floor_loss(run.cfg, s, stage, x, y)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def conventional_loss(cfg, s, stage, x, y):
    """The conventional KD-library step's loss: full teacher and student passes, features by name."""
    plan = stage.plans[0] if stage.guided else None
    with torch.no_grad():
        t = s.teacher.taps(x, [None] + ([plan.hint] if plan else []))
    return method_loss(cfg, s, plan, t, s.net.taps(x, [None] + ([plan.guided] if plan else [])), y)


class UInt8Images(torch.utils.data.Dataset):
    """Images kept as uint8 arrays and turned into PIL images one at a time, as torchvision's CIFAR10 and
    MNIST datasets do in __getitem__."""

    def __init__(self, n, shape, transform):
        c, h, w = shape
        self.images = np.random.default_rng(0).integers(0, 256, (n, h, w, c) if c > 1 else (n, h, w), dtype=np.uint8)
        self.labels = np.random.default_rng(1).integers(0, 10, n)
        self.transform = transform

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def conventional_loader(shape, n, batch, augment, pad: int = 8):
    """The dataset with per-sample PIL transforms, through a DataLoader with 2 workers."""
    steps = [T.RandomCrop(shape[1], padding=pad), T.RandomHorizontalFlip()] if augment else []
    ds = UInt8Images(n, shape, T.Compose(steps + [T.ToTensor()]))
    return torch.utils.data.DataLoader(ds, batch_size=batch, shuffle=True, num_workers=2, drop_last=True)


def params_of(s, stage):
    return [p for module in trained_modules(s, stage) for p in module.parameters()]


def optimizer(run, s, stage):
    """The optimiser our loop makes for the stage (the recipe's), for every loop."""
    return make_optimizer(trained_modules(s, stage), list(s.regressors.values()) + list(s.terms.values()), run.optim)


def bench_stage(run, s, stage, shape, steps, batch, device, full):
    """images/s of (a), (b) and (c) for one stage; (b) trains on the first images of `full`."""
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch,), device=device)

    opt = optimizer(run, s, stage)
    for _ in range(steps):                                  # warm-up
        floor_step(run, s, stage, x, y, opt)
    sync(device)
    start = time.perf_counter()
    for _ in range(2 * steps):
        floor_step(run, s, stage, x, y, opt)
    sync(device)
    floor = 2 * steps * batch / (time.perf_counter() - start)

    n = steps * batch
    train = Resident(full[:n], torch.randint(0, 10, (n,), device=device))
    result = train_stage(run, s, stage, train, None, 3, Progress())
    ours = n / statistics.median(h["epoch_s"] for h in result["history"][1:])   # epoch 1 warms up

    aug = augmentation(run)
    loader = conventional_loader(shape, 3 * n, batch, aug.pad or aug.flip, aug.pad)
    opt = optimizer(run, s, stage)
    for i, (xb, yb) in enumerate(loader):
        if i == steps:                                       # the first `steps` batches warm up
            start = time.perf_counter()
        xb, yb = xb.to(device), yb.to(device)
        with autocast(run.cfg, device):
            loss = conventional_loss(run.cfg, s, stage, xb, yb)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        loss.item()
    conventional = 2 * steps * batch / (time.perf_counter() - start)
    return floor, ours, conventional


def write_jpegs(root: Path, n: int, classes: int = 10) -> Path:
    """n JPEGs of 72 to 120 pixels a side in root/train/<class>/, as a camera folder would hold them."""
    rng = np.random.default_rng(0)
    for i in range(n):
        folder = root / "train" / f"class{i % classes}"
        folder.mkdir(parents=True, exist_ok=True)
        h, w = rng.integers(72, 121, 2)
        Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(folder / f"{i}.jpg", quality=90)
    return root


def bench_streaming(device, n: int, batch: int, workers: int, tb_dir: str) -> dict:
    """images/s and data-wait share of (d) our streaming path and (e) a plain ImageFolder + DataLoader loop, on
    the second of two epochs over n JPEGs, training the same ResNet-18 with the same SGD step."""
    with tempfile.TemporaryDirectory() as tmp:
        root = write_jpegs(Path(tmp), n)
        cfg = api.compose("train", [
                "dataset=imagefolder", f"data.root={root}", "dataset.valid_size=10", "dataset.images.size=32",
                "dataset.images.channels=3", f"data.workers={workers}", "student=torchvision",
                "student.arch=resnet18", "schedule=backprop", f"recipe.student.batch_size={batch}",
                "recipe.student.lr_batch=0", "recipe.student.lr=0.01", f"device={device.type}"])
        train = load_data(cfg.dataset, cfg.data, device).train
        torch.manual_seed(0)
        net = build_network(cfg.student, cfg.dataset.in_shape, cfg.dataset.num_classes).to(device)
        run = Run(cfg, cfg.recipe.student, device, Splits(None, None, None), None, SummaryWriter(tb_dir))
        ours = train_stage(run, Session(net), backprop_stage(), train, None, 2, Progress())["history"][1]

        torch.manual_seed(0)
        net = build_network(cfg.student, cfg.dataset.in_shape, cfg.dataset.num_classes).to(device)
        opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9, weight_decay=1e-4)
        transform = T.Compose([T.RandomResizedCrop(32), T.RandomHorizontalFlip(), T.ToTensor()])
        loader = torch.utils.data.DataLoader(
            torch.utils.data.Subset(torchvision.datasets.ImageFolder(root / "train", transform), range(len(train))),
            batch_size=batch, shuffle=True,
            num_workers=workers, pin_memory=device.type == "cuda", persistent_workers=workers > 0)
        for epoch in range(2):
            waited, images, started = 0.0, 0, time.perf_counter()
            batches = iter(loader)
            while True:
                t = time.perf_counter()
                xy = next(batches, None)
                waited += time.perf_counter() - t
                if xy is None:
                    break
                x, y = xy[0].to(device, non_blocking=True), xy[1].to(device, non_blocking=True)
                loss = torch.nn.functional.cross_entropy(net(x), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                loss.item()
                images += len(y)
            spent = time.perf_counter() - started
    return {"pair": f"ResNet-18, {n} JPEGs, crops 32, {workers} workers", "stage": "streaming (backprop)",
            "ours_ips": ours["images_s"], "ours_data_wait": ours["data_wait"], "conventional_ips": images / spent,
            "conventional_data_wait": waited / spent, "d_over_e": ours["images_s"] / (images / spent)}


def peak_memory_gib(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20   # KiB on Linux


def main():
    parser = argparse.ArgumentParser(description="fitnets training throughput: floor vs ours vs conventional")
    parser.add_argument("--steps", type=int, default=4, help="timed steps per measurement")
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--amp", choices=["on", "off", "both"], default="off",
                        help="bf16 autocast (the CLI's amp); both: each stage in fp32 and in bf16")
    parser.add_argument("--compile", action="store_true", help="torch.compile each layer (the CLI's compile)")
    parser.add_argument("--channels-last", choices=["on", "off", "both", "preset"], default="preset",
                        help="the CLI's channels_last; both: each stage in each layout; preset: as each pair's config")
    parser.add_argument("--only", help="run only the pairs whose name contains this (streaming: that case only)")
    parser.add_argument("--images", type=int, default=4000, help="streaming: JPEGs in the folder")
    parser.add_argument("--workers", type=int, default=2, help="streaming: loader workers")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--tb", default="/tmp/fitnets-bench-tb", help="TensorBoard scratch directory")
    args = parser.parse_args()
    device = pick_device(args.device)
    console = Console()
    results = []
    amps = {"off": [False], "on": [True], "both": [False, True]}[args.amp]
    layouts = {"off": [False], "on": [True], "both": [False, True], "preset": [None]}[args.channels_last]
    for pair, (overrides, shape, train_size) in PAIRS.items():
        if args.only and args.only not in pair:
            continue
        # A full-size dataset on the device (train, valid, test), as a real run holds it, so peak memory
        # counts it; and evaluation at the CLI's batch size, whose activations are the largest.
        full = torch.randn(train_size, *shape, device=device)
        held_out = torch.randn(2 * 10_000, *shape, device=device)
        for amp in amps:
            for layout in layouts:
                options = [f"device={device.type}", f"amp={amp}", f"compile={args.compile}"]
                options += [] if layout is None else [f"channels_last={layout}"]
                run, s, stages = setup(overrides + options, device, args.tb)
                evaluate(s.net, Resident(held_out[:2000], torch.zeros(2000, dtype=torch.long, device=device)),
                         1000)
                for stage in stages:
                    floor, ours, conventional = bench_stage(run, s, stage, shape, args.steps, args.batch, device, full)
                    results.append({"pair": pair, "stage": "1 (hints)" if stage.guided else "2 (KD)",
                                    "amp": "bf16" if amp else "fp32", "channels_last": run.cfg.channels_last,
                                    "floor_ips": floor, "ours_ips": ours, "conventional_ips": conventional,
                                    "b_over_a": ours / floor, "b_over_c": ours / conventional})
                    console.print(results[-1])
                results[-1]["peak_memory_gib"] = results[-2]["peak_memory_gib"] = peak_memory_gib(device)
        del full, held_out
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {torch.get_num_threads()} threads"
    streaming = []
    if not args.only or args.only == "streaming":
        streaming.append(bench_streaming(device, args.images, 64, args.workers, args.tb))
        table = Table(title=f"streaming training images/s on {name}, batch 64")
        for col in ("case", "(d) ours", "data wait", "(e) conventional", "data wait", "d/e"):
            table.add_column(col)
        for r in streaming:
            table.add_row(r["pair"], f"{r['ours_ips']:.0f}", f"{r['ours_data_wait']:.0%}",
                          f"{r['conventional_ips']:.0f}", f"{r['conventional_data_wait']:.0%}", f"{r['d_over_e']:.2f}")
        console.print(table)
    table = Table(title=f"training images/s on {name}, batch {args.batch}, compile {args.compile}")
    for col in ("pair", "stage", "amp", "channels_last", "(a) floor", "(b) ours", "(c) conventional", "b/a", "b/c",
                "peak GiB"):
        table.add_column(col)
    for r in results:
        table.add_row(r["pair"], r["stage"], r["amp"], str(r["channels_last"]), f"{r['floor_ips']:.0f}",
                      f"{r['ours_ips']:.0f}", f"{r['conventional_ips']:.0f}", f"{r['b_over_a']:.2f}",
                      f"{r['b_over_c']:.2f}", f"{r['peak_memory_gib']:.2f}")
    if results:
        console.print(table)
    # Our loop against itself with one setting changed, in the same run: bf16 over fp32, channels_last over not.
    speedups = []
    for setting, key, on, off in (("bf16_over_fp32", "amp", "bf16", "fp32"),
                                  ("channels_last_over_contiguous", "channels_last", True, False)):
        base = {(r["pair"], r["stage"], r["amp"], r["channels_last"]): r["ours_ips"] for r in results if r[key] == off}
        for r in results:
            other = {**r, key: off}
            at = (other["pair"], other["stage"], other["amp"], other["channels_last"])
            if r[key] == on and at in base:
                speedups.append({"pair": r["pair"], "stage": r["stage"], setting: r["ours_ips"] / base[at]})
                console.print(f"{r['pair']}, stage {r['stage']}: {setting} {speedups[-1][setting]:.2f}x (our loop)")
    if args.json:
        meta = {"device": name, "machine": platform.machine(), "torch": torch.__version__, "batch": args.batch,
                "steps": args.steps, "amp": args.amp, "compile": args.compile, "channels_last": args.channels_last}
        with open(args.json, "w") as f:
            json.dump({**meta, "results": results, "speedups": speedups, "streaming": streaming}, f, indent=2)


if __name__ == "__main__":
    main()
