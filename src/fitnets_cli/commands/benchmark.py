"""`fitnets compare layout=benchmark`: the runs laid out as a distillation benchmark's tables (a column per
teacher/student pair, a row per method), beside the figures the benchmark's papers published."""

import csv
import io
import json

from rich.table import Table

from fitnets_cli.config.errors import ConfigError

# CIFAR-100 test accuracy (%) published for the CRD benchmark's 13 pairs: the CRD paper's Tables 1 and 2
# (Tian, Krishnan and Isola, Contrastive Representation Distillation, ICLR 2020), as tabulated in the
# README of its code, HobbitLong/RepDistiller, whose train_student.py says they are the last epoch's, trained
# on all 50,000 training images. Per (teacher, student): the teacher, the student trained alone, KD, and
# "FitNet", the one-stage imitation that schedule=crd_fitnet runs (the paper's two stages, schedule=fitnets,
# were not in the benchmark).
CRD = {
    ("wrn_40_2", "wrn_16_2"): (75.61, 73.26, 74.92, 73.58),
    ("wrn_40_2", "wrn_40_1"): (75.61, 71.98, 73.54, 72.24),
    ("resnet56", "resnet20"): (72.34, 69.06, 70.66, 69.21),
    ("resnet110", "resnet20"): (74.31, 69.06, 70.67, 68.99),
    ("resnet110", "resnet32"): (74.31, 71.14, 73.08, 71.06),
    ("resnet32x4", "resnet8x4"): (79.42, 72.50, 73.33, 73.50),
    ("vgg13", "vgg8"): (74.64, 70.36, 72.98, 71.02),
    ("vgg13", "MobileNetV2"): (74.64, 64.60, 67.37, 64.14),
    ("ResNet50", "MobileNetV2"): (79.34, 64.60, 67.35, 63.16),
    ("ResNet50", "vgg8"): (79.34, 70.36, 73.81, 70.69),
    ("resnet32x4", "ShuffleV1"): (79.42, 70.50, 74.07, 73.59),
    ("resnet32x4", "ShuffleV2"): (79.42, 71.82, 74.45, 73.54),
    ("wrn_40_2", "ShuffleV1"): (75.61, 70.50, 74.83, 73.73),
}
# The same README's AT, SP and PKT rows (attention transfer, Zagoruyko & Komodakis, ICLR 2017; similarity-
# preserving, Tung & Mori, ICCV 2019; probabilistic knowledge transfer, Passalis & Tefas, ECCV 2018), which
# schedule=at, sp and pkt run with the weights of its scripts/run_cifar_distill.sh.
HINT_FAMILY = {
    ("wrn_40_2", "wrn_16_2"): (74.08, 73.83, 74.54),
    ("wrn_40_2", "wrn_40_1"): (72.77, 72.43, 73.45),
    ("resnet56", "resnet20"): (70.55, 69.67, 70.34),
    ("resnet110", "resnet20"): (70.22, 70.04, 70.25),
    ("resnet110", "resnet32"): (72.31, 72.69, 72.61),
    ("resnet32x4", "resnet8x4"): (73.44, 72.94, 73.64),
    ("vgg13", "vgg8"): (71.43, 72.68, 72.88),
    ("vgg13", "MobileNetV2"): (59.40, 66.30, 67.13),
    ("ResNet50", "MobileNetV2"): (58.58, 68.08, 66.52),
    ("ResNet50", "vgg8"): (71.84, 73.34, 73.01),
    ("resnet32x4", "ShuffleV1"): (71.73, 73.48, 74.10),
    ("resnet32x4", "ShuffleV2"): (72.73, 74.56, 74.69),
    ("wrn_40_2", "ShuffleV1"): (73.32, 74.52, 73.89),
}
# Decoupled KD (Zhao et al., CVPR 2022) on CIFAR-100, from the README of its code, megvii-research/mdistiller
# (schedule=dkd). The README heads its last column "ResNet32x4 MobileNet-V2", but that column's KD figure,
# 74.45, is the CRD table's resnet32x4 -> ShuffleV2, the pair the DKD paper's Table 2 has there: read as ShuffleV2.
DKD = {("resnet56", "resnet20"): 71.97, ("resnet110", "resnet32"): 74.11, ("resnet32x4", "resnet8x4"): 76.32,
       ("wrn_40_2", "wrn_16_2"): 76.23, ("wrn_40_2", "wrn_40_1"): 74.81, ("vgg13", "vgg8"): 74.68,
       ("resnet32x4", "ShuffleV1"): 76.45, ("wrn_40_2", "ShuffleV1"): 76.70, ("vgg13", "MobileNetV2"): 69.71,
       ("ResNet50", "MobileNetV2"): 70.35, ("resnet32x4", "ShuffleV2"): 77.07}
# (dataset, teacher, student) -> {method: published CIFAR-100 test accuracy %}: the CRD benchmark's and DKD's,
# and the FitNet figures of OFA's heterogeneous pairs (Hao et al., One-for-All KD, NeurIPS 2023, its CIFAR-100
# table; experiment=ofa_cifar100), a one-stage imitation, crd_fitnet here.
PUBLISHED = {("cifar100", *pair): dict(zip(("teacher", "backprop", "kd", "crd_fitnet", "at", "sp", "pkt"),
                                           figures + HINT_FAMILY[pair]))
             for pair, figures in CRD.items()}
for pair, figure in DKD.items():
    PUBLISHED.setdefault(("cifar100", *pair), {})["dkd"] = figure
PUBLISHED.update({
    ("cifar100_224", "swin_tiny_patch4_window7_224", "resnet18"): {"crd_fitnet": 78.87},
    ("cifar100_224", "vit_small_patch16_224", "resnet18"): {"crd_fitnet": 77.71},
    ("cifar100_224", "vit_small_patch16_224", "mobilenetv2_100"): {"crd_fitnet": 73.54},
    ("cifar100_224", "convnext_tiny", "deit_tiny_patch16_224"): {"crd_fitnet": 60.78},
})
SOURCES = {"cifar100": "the CRD paper's Tables 1-2 (Tian et al., ICLR 2020; HobbitLong/RepDistiller), last epoch, "
                       "trained on all 50,000 training images; its FitNet is crd_fitnet here; DKD from "
                       "megvii-research/mdistiller's README",
           "cifar100_224": "OFA's CIFAR-100 table (Hao et al., NeurIPS 2023; Hao840/OFAKD), its one-stage FitNet "
                           "(crd_fitnet here)"}
METHODS = {"teacher": "teacher", "backprop": "student (backprop)", "kd": "KD", "hint_joint": "hint_joint",
           "crd_fitnet": "FitNet (crd_fitnet)", "at": "AT", "sp": "SP", "pkt": "PKT", "dkd": "DKD",
           "at_kd": "AT + KD", "fitnets": "FitNets, two stages (fitnets)"}


def benchmark_records(rows: list[dict]) -> list[dict]:
    """One record per (pair, method, variant) of the runs' teacher/student pairs, the benchmark's pairs first
    in its order, each with the published figure for that pair and method where there is one."""
    students = [r for r in rows if r["role"] == "student" and r.get("teacher") and "test_acc" in r]
    pairs = list(dict.fromkeys((r["dataset"], r["teacher"], r["model"]) for r in students))
    known = list(PUBLISHED)
    pairs.sort(key=lambda p: known.index(p) if p in known else len(known))
    records = []
    for dataset, teacher, student in pairs:
        published = PUBLISHED.get((dataset, teacher, student), {})
        by_method = {"teacher": [r for r in rows if r["role"] == "teacher" and r["model"] == teacher
                                 and r["dataset"] == dataset and "test_acc" in r]}
        for r in students:
            if (r["dataset"], r["teacher"], r["model"]) == (dataset, teacher, student):
                by_method.setdefault(r["schedule"], []).append(r)
        for method in published:
            by_method.setdefault(method, [])
        for method, runs in by_method.items():
            records += [{"dataset": dataset, "teacher": teacher, "student": student, "method": method,
                         "variant": r.get("variant") or "", "published": published.get(method),
                         **{k: r.get(k) for k in ("seeds", "test_acc", "test_acc_std", "test_acc_last",
                                                  "test_acc_last_std", "runs")}} for r in runs or [{}]]
    return records


def benchmark_table(records: list[dict], metric: str) -> tuple[list[str], list[list[str]]]:
    """The records laid out as the benchmark's tables: a column per pair, a row per method, each followed
    by a row of the published figures where the benchmark has them."""
    pairs = list(dict.fromkeys((r["dataset"], r["teacher"], r["student"]) for r in records))
    several = len({p[0] for p in pairs}) > 1
    header = ["method"] + [f"{t} -> {s}" + (f" ({d})" if several else "") for d, t, s in pairs]
    order = lambda m: list(METHODS).index(m) if m in METHODS else len(METHODS)
    methods = sorted(dict.fromkeys((r["method"], r["variant"]) for r in records), key=lambda mv: order(mv[0]))
    value = lambda v: f"{100 - v if metric == 'error' else v:.2f}"
    lines = []
    for method, variant in methods:
        at = {(r["dataset"], r["teacher"], r["student"]): r for r in records
              if (r["method"], r["variant"]) == (method, variant)}
        cells = []
        for p in pairs:
            r = at.get(p, {})
            cells.append("" if r.get("test_acc") is None else value(r["test_acc_last"]) +
                         (f" ± {r['test_acc_last_std']:.2f}" if r["seeds"] > 1 else "") + f" ({value(r['test_acc'])})")
        published = not variant and any(at.get(p, {}).get("published") for p in pairs)
        if any(cells) or published:   # a method not run is named over its published figures
            lines.append([METHODS.get(method, method) + (f" [{variant}]" if variant else "")] + cells)
        if published:
            lines.append(["  published"] + ["" if at.get(p, {}).get("published") is None else
                                            value(at[p]["published"]) for p in pairs])
    return header, lines


def benchmark_view(rows: list[dict], metric: str, fmt: str) -> tuple[list[dict], Table, str | None]:
    """The benchmark-style table of the runs: its records, as a rich table, and as text in `fmt` (None for
    format=table)."""
    records = benchmark_records(rows)
    if not records:
        raise ConfigError("layout=benchmark needs runs of students trained with a teacher (runs=DIR)")
    header, lines = benchmark_table(records, metric)
    cited = [f"{d}: {SOURCES[d]}" for d in dict.fromkeys(r["dataset"] for r in records if r["published"] is not None)]
    note = (f"test {metric} %: at the last epoch (at the best-validation epoch in brackets), mean ± sample std "
            "over seeds" + "".join(f"; published, {c}" for c in cited))
    table = Table(title="benchmark", caption=note)
    for i, h in enumerate(header):
        table.add_column(h, justify="left" if i == 0 else "right", overflow="fold")
    for line in lines:
        table.add_row(*line)
    text = None
    if fmt == "md":
        text = "\n".join("| " + " | ".join(line) + " |" for line in [header, ["---"] * len(header), *lines])
        text += f"\n\n{note}\n"
    elif fmt == "json":
        text = json.dumps(records, indent=2) + "\n"
    elif fmt == "csv":
        buf = io.StringIO()
        writer = csv.DictWriter(buf, [k for k in records[0] if k != "runs"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(records)
        text = buf.getvalue()
    return records, table, text
