"""fitnets against the tool a user would pick instead: torchdistill's own training loop on the same work.

For each pair (resnet56 -> resnet20 and resnet32x4 -> resnet8x4, CIFAR-100 shape, experiment=crd_cifar100) and
each stage of the paper's method (1: the student up to its guided layer plus a ConvReg regressor, MSE on the
teacher's hint; 2: the whole student, CE + KD), in one process, alternating, `--repeats` times:

  torchdistill   its DistillationBox (get_distillation_box) driven by its example script's epoch loop
                 (pre_epoch_process, forward_process, post_forward_process per batch), its PIL data path
                 (torchvision's CIFAR100 with RandomCrop(32, 4), RandomHorizontalFlip, ToTensor, Normalize,
                 as its CIFAR sample configs) through a DataLoader with 0 and with 2 workers; the teacher in
                 eval mode, and in torchdistill's default mode (it never calls eval(): BN in training mode)
  fitnets        fitnets' own loop (loop.train_stage, as `fitnets train` runs it) on its device-resident data
                 path with the composed config's defaults (channels_last as the preset sets it), and with
                 channels_last switched off

Both sides train the same networks: torchdistill's own ResNet4Cifar resnet56/resnet20 classes (fitnets' zoo
ones in the fitnets rows: same layers; both sides' parameter counts are in the JSON) and, since torchdistill
has no resnet32x4 or resnet8x4, fitnets' zoo classes (RepDistiller's) in both; the same hint and guided
layers, optimiser (the recipe's SGD), batch, threads and number of steps. Each setting trains `--epochs`
epochs of `--steps` batches; the first warms up and the median of the rest is its images/s. The data are
CIFAR-100 files in the official python format written by this script (random pixels: the speed of a step
does not depend on them).

  pip install '.[peer]'        # torchdistill, pinned (make bench-peer installs it)
  python scripts/bench_peer.py [--repeats 3] [--steps 20] [--epochs 3] [--batch 64] [--threads 2]
                               [--only resnet56] [--json docs/bench/peer_cpu.json]
"""

import argparse
import json
import pickle
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
import torchvision.transforms as T
from rich.console import Console
from rich.table import Table
from torch.utils.tensorboard import SummaryWriter

from fitnets_cli import api
from fitnets_cli.data.splits import Resident, Splits
from fitnets_cli.networks.build import build_network
from fitnets_cli.training.loop import Run, train_stage
from fitnets_cli.training.resume import Progress
from fitnets_cli.training.stages import plan_stages, session

PAIRS = {"resnet56 -> resnet20": "resnet56-resnet20", "resnet32x4 -> resnet8x4": "resnet32x4-resnet8x4"}
MEAN, STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)   # CIFAR-100's, as RepDistiller and torchdistill


def write_cifar100(root: Path, n: int) -> Path:
    """CIFAR-100 as torchvision reads it (pickled `train`, `test` and `meta` in cifar-100-python/), n images."""
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, size in (("train", n), ("test", 100)):
        batch = {"data": rng.integers(0, 256, (size, 3072), dtype=np.uint8),
                 "fine_labels": [i % 100 for i in range(size)],
                 "coarse_labels": [i % 20 for i in range(size)], "filenames": [f"{i}.png" for i in range(size)],
                 "batch_label": split}
        (folder / split).write_bytes(pickle.dumps(batch))
    (folder / "meta").write_bytes(pickle.dumps({"fine_label_names": [str(i) for i in range(100)],
                                                "coarse_label_names": [str(i) for i in range(20)]}))
    return root


def cifar100(root: Path):
    """torchvision's CIFAR100 with torchdistill's CIFAR training transforms; the MD5 check is off because the
    files are this script's, not the published ones."""
    torchvision.datasets.cifar.check_integrity = lambda *args: True
    transform = T.Compose([T.RandomCrop(32, padding=4), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(MEAN, STD)])
    return torchvision.datasets.CIFAR100(str(root), train=True, transform=transform, download=False)


def compose(pair: str, channels_last: bool | None = None):
    options = [] if channels_last is None else [f"channels_last={channels_last}"]
    return api.compose("train", ["experiment=crd_cifar100", f"pair={pair}", "schedule=fitnets", "device=cpu"] + options)


def fitnets_networks(cfg):
    torch.manual_seed(0)
    teacher = build_network(cfg.teacher, cfg.dataset.in_shape, 100, 0.05).eval().requires_grad_(False)
    student = build_network(cfg.student, cfg.dataset.in_shape, 100, cfg.recipe.student.init_range)
    return teacher, student


def torchdistill_networks(cfg):
    """The pair as plain modules for torchdistill: its own CIFAR ResNets where it has them, else fitnets' zoo's."""
    from torchdistill.models.classification import resnet

    own = {"resnet56": resnet.resnet56, "resnet20": resnet.resnet20}
    zoo_teacher, zoo_student = fitnets_networks(cfg)
    teacher = own[cfg.teacher.arch](num_classes=100) if cfg.teacher.arch in own else zoo_teacher.model
    student = own[cfg.student.arch](num_classes=100) if cfg.student.arch in own else zoo_student.model
    return teacher, student


def top_module(tap: str) -> str:
    """torchdistill's module path for a fitnets tap: the zoo's hint points are whole top-level blocks."""
    return tap.split(".")[0]


def up_to(model, tap: str) -> list[str]:
    """The model's top-level modules up to and including `tap`'s, for torchdistill's `sequential` (a ReLU the
    model applies functionally, as the zoo's stems do, has no module and is left out: one elementwise op)."""
    names = [name for name, _ in model.named_children()]
    return names[:names.index(top_module(tap)) + 1]


def torchdistill_stage(cfg, stage, teacher, student, hint_shape, guided_shape, workers: int, batch: int) -> dict:
    """torchdistill's train_config for one stage, as its FitNet sample config writes it (stage 1: sequential
    parts up to the hint and guided layers, a ConvReg adaptation, MSE; stage 2: CE + KD)."""
    optim = cfg.recipe.student
    loader = {"dataset_id": "train", "sampler": {"class_or_func": torch.utils.data.RandomSampler, "kwargs": {}},
              "kwargs": {"batch_size": batch, "num_workers": workers, "drop_last": True}}
    config = {"num_epochs": 1, "train_data_loader": loader,
              "optimizer": {"key": "SGD", "kwargs": {"lr": optim.lr, "momentum": optim.momentum,
                                                      "weight_decay": optim.weight_decay}}}
    forward = {"forward_proc": "forward_batch_only"}
    if stage.guided:
        plan = stage.plans[0]
        hint, guided = top_module(plan.hint), top_module(plan.guided)
        config["teacher"] = {"sequential": up_to(teacher, hint), "forward_hook": {"input": [], "output": [hint]},
                             "requires_grad": False, **forward}
        config["student"] = {"adaptations": {"convreg": {"key": "ConvReg", "kwargs": {
                                 "num_input_channels": guided_shape[0], "num_output_channels": hint_shape[0],
                                 "kernel_size": 3, "stride": 1, "padding": 1, "uses_relu": True}}},
                             "sequential": up_to(student, guided) + ["+convreg"],
                             "forward_hook": {"input": [], "output": ["+convreg"]}, "requires_grad": True, **forward}
        config["criterion"] = {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"hint": {
            "criterion": {"key": "MSELoss", "kwargs": {"reduction": "mean"}},
            "criterion_wrapper": {"key": "SimpleLossWrapper", "kwargs": {
                "input": {"is_from_teacher": False, "module_path": "+convreg", "io": "output"},
                "target": {"is_from_teacher": True, "module_path": hint, "io": "output"}}},
            "weight": cfg.schedule.hint_weight}}}}
    else:
        kd = cfg.recipe.kd
        config["teacher"] = {"sequential": [], "requires_grad": False, **forward}
        config["student"] = {"sequential": [], "requires_grad": True, **forward}
        config["criterion"] = {"key": "WeightedSumLoss", "kwargs": {"sub_terms": {"kd": {
            "criterion": {"key": "KDLoss", "kwargs": {
                "student_module_path": ".", "student_module_io": "output", "teacher_module_path": ".",
                "teacher_module_io": "output", "temperature": kd.tau, "alpha": kd.ce_weight, "beta": kd.lam_start,
                "reduction": "batchmean"}},
            "weight": 1.0}}}}
    return config


def time_torchdistill(cfg, stage, plan_shapes, dataset, workers, batch, steps, epochs, teacher_eval) -> float:
    """images/s of torchdistill's epoch loop (its example script's train_one_epoch) over `steps` batches."""
    from torchdistill.core.distillation import get_distillation_box

    teacher, student = torchdistill_networks(cfg)
    if teacher_eval:
        teacher.eval()
    else:
        teacher.train()
    subset = torch.utils.data.Subset(dataset, range(steps * batch))
    config = torchdistill_stage(cfg, stage, teacher, student, *plan_shapes, workers, batch)
    box = get_distillation_box(teacher, student, {"train": subset}, config, torch.device("cpu"), None, False, 1)
    times = []
    for epoch in range(epochs):
        start = time.perf_counter()
        box.pre_epoch_process(epoch=epoch)
        for sample_batch, targets, supp_dict in box.train_data_loader:
            loss = box.forward_process(sample_batch, targets, supp_dict)
            box.post_forward_process(loss=loss)
        times.append(time.perf_counter() - start)
    return steps * batch / statistics.median(times[1:])


def time_fitnets(cfg, stage_index, batch, steps, epochs, tb) -> float:
    """images/s of fitnets' own loop (loop.train_stage, as the CLI runs it) over `steps` batches an epoch."""
    teacher, student = fitnets_networks(cfg)
    stages = plan_stages(cfg, teacher, student)
    s = session(student, teacher, stages, torch.device("cpu"))
    run = Run(cfg, cfg.recipe.student, torch.device("cpu"), Splits(None, None, None), None, tb)
    n = steps * batch
    train = Resident(torch.randn(n, 3, 32, 32), torch.arange(n) % 100)
    result = train_stage(run, s, stages[stage_index], train, None, epochs, Progress())
    return n / statistics.median(h["epoch_s"] for h in result["history"][1:])


def cpu_name() -> str:
    """The CPU's model name (timings do not carry across CPUs, so each figure names its own)."""
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def main():
    parser = argparse.ArgumentParser(description="fitnets vs torchdistill: training images/s, both stages")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20, help="batches an epoch")
    parser.add_argument("--epochs", type=int, default=3, help="epochs a measurement (the first warms up)")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", help="only the pairs whose name contains this")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    try:
        import torchdistill
    except ImportError:
        raise SystemExit("error: torchdistill is not installed: pip install '.[peer]' in the fitnets clone "
                         "(make bench-peer installs it)") from None

    console = Console(width=150)   # the table's full width in a log file too
    root = write_cifar100(Path(tempfile.mkdtemp(prefix="fitnets-peer-")), args.steps * args.batch)
    dataset, tb = cifar100(root), SummaryWriter(tempfile.mkdtemp(prefix="fitnets-peer-tb-"))
    settings = [("torchdistill", "teacher eval, 0 workers", dict(workers=0, teacher_eval=True)),
                ("torchdistill", "teacher eval, 2 workers", dict(workers=2, teacher_eval=True)),
                ("torchdistill", "teacher default, 2 workers", dict(workers=2, teacher_eval=False)),
                ("fitnets", "defaults", dict(channels_last=None)),
                ("fitnets", "channels_last=false", dict(channels_last=False))]
    rows = []
    for name, pair in PAIRS.items():
        if args.only and args.only not in name:
            continue
        cfg = compose(pair)
        teacher, student = fitnets_networks(cfg)
        stages = plan_stages(cfg, teacher, student)
        sizes = {"teacher_params": sum(p.numel() for p in teacher.parameters()),
                 "student_params": sum(p.numel() for p in student.parameters())}
        td_teacher, td_student = torchdistill_networks(cfg)
        sizes |= {"torchdistill_teacher_params": sum(p.numel() for p in td_teacher.parameters()),
                  "torchdistill_student_params": sum(p.numel() for p in td_student.parameters())}
        for i, stage in enumerate(stages):
            shapes = (stage.plans[0].hint_shape, stage.plans[0].guided_shape) if stage.guided else (None, None)
            samples = {(tool, setting): [] for tool, setting, _ in settings}
            for _ in range(args.repeats):   # alternating, so a slow spell of the machine hits every setting
                for tool, setting, opts in settings:
                    if tool == "torchdistill":
                        ips = time_torchdistill(cfg, stage, shapes, dataset, opts["workers"], args.batch, args.steps,
                                                args.epochs, opts["teacher_eval"])
                    else:
                        ips = time_fitnets(compose(pair, opts["channels_last"]), i, args.batch, args.steps,
                                           args.epochs, tb)
                    samples[tool, setting].append(ips)
                    console.print(f"{name} stage {i + 1} {tool} {setting}: {ips:.1f} images/s")
            best_peer = max(statistics.median(v) for (tool, _), v in samples.items() if tool == "torchdistill")
            for (tool, setting), v in samples.items():
                rows.append({"pair": name, "stage": "1 (hints)" if stage.guided else "2 (KD)", "tool": tool,
                             "setting": setting, "images_s": v, "median": statistics.median(v),
                             "over_best_torchdistill": statistics.median(v) / best_peer, **sizes})
    meta = {"cpu": cpu_name(), "threads": args.threads, "batch": args.batch, "steps": args.steps, "epochs": args.epochs,
            "repeats": args.repeats, "torch": torch.__version__, "torchdistill": torchdistill.__version__}
    table = Table(title=f"training images/s on {meta['cpu']}, {args.threads} threads, batch {args.batch}, "
                        f"median of {args.repeats}")
    for col in ("pair", "stage", "tool", "setting", "median", "min-max", "/ best torchdistill"):
        table.add_column(col)
    for r in rows:
        table.add_row(r["pair"], r["stage"], r["tool"], r["setting"], f"{r['median']:.1f}",
                      f"{min(r['images_s']):.1f}-{max(r['images_s']):.1f}", f"{r['over_best_torchdistill']:.2f}")
    console.print(table)
    if args.json:
        Path(args.json).write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
