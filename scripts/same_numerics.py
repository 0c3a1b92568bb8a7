"""Check that a change to the code leaves training bit-identical: run the same short, deterministic runs on the
shipped MNIST subset with two trees of fitnets and compare what they leave.

    OLD_VENV/bin/python scripts/same_numerics.py run OUT_OLD   # the fitnets installed there runs
    python scripts/same_numerics.py run OUT_NEW
    python scripts/same_numerics.py compare OUT_OLD OUT_NEW

OLD_VENV is an environment with the old tree installed (`git worktree add OLD_TREE COMMIT`, then
`OLD_VENV/bin/pip install -e OLD_TREE`): PYTHONPATH=OLD_TREE/src is not enough, since an editable install maps
fitnets_cli.conf to its own tree's conf/.

The runs: the MNIST teacher (1 epoch), then the MNIST FitNet (2 epochs a stage) by each schedule preset (hints +
KD, KD, backprop, hint_joint, crd_fitnet), by backprop with retrain_full (a second phase from scratch) and by
hints + KD with two hint pairs (two hint stages). `compare` checks every run's
metrics.json (less timings, wall time, provenance and device) and every tensor of its checkpoints."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

BASE = ["dataset=mnist_subset", "device=cpu", "deterministic=true", "recipe.teacher.max_epochs=1",
        "recipe.student.max_epochs=2"]
RUNS = {"teacher": ["train-teacher"],
        "fitnets": ["train", "student=fitnet_mnist", "schedule=fitnets"],
        "kd": ["train", "student=fitnet_mnist", "schedule=kd"],
        "backprop": ["train", "student=fitnet_mnist", "schedule=backprop"],
        "retrain": ["train", "student=fitnet_mnist", "schedule=backprop", "recipe.retrain_full=true"],
        "hint_joint": ["train", "student=fitnet_mnist", "schedule=hint_joint"],
        "crd_fitnet": ["train", "student=fitnet_mnist", "schedule=crd_fitnet"],
        "two_pairs": ["train", "student=fitnet_mnist", "schedule=fitnets",
                      "hints.pairs=[{hint: conv1, guided: conv2}, {hint: conv2, guided: conv4}]"]}
VARYING = ("epoch_s", "images_s", "data_wait", "wall_s", "provenance", "device")


def run(out: Path) -> None:
    """Each run of RUNS into out/<name>, the teacher stored in out/teachers."""
    for name, args in RUNS.items():
        command = [sys.executable, "-m", "fitnets_cli", *args, *BASE, f"teacher_store={out / 'teachers'}",
                   f"hydra.run.dir={out / name}"]
        print(" ".join(command[2:]), flush=True)
        subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, stdout=subprocess.DEVNULL)


def stable(obj):
    """metrics.json less what differs between identical runs."""
    if isinstance(obj, dict):
        return {k: stable(v) for k, v in obj.items() if k not in VARYING}
    return [stable(v) for v in obj] if isinstance(obj, list) else obj


def compare(a: Path, b: Path) -> int:
    """0 when every run's metrics and checkpoint tensors agree; else 1, naming each difference."""
    differences = 0
    for name in RUNS:
        if stable(json.loads((a / name / "metrics.json").read_text())) != \
                stable(json.loads((b / name / "metrics.json").read_text())):
            print(f"{name}: metrics.json differs")
            differences += 1
        for file in sorted((a / name / "checkpoints").glob("*.pt")):
            if file.name == "last.pt":
                continue
            old, new = (torch.load(d / name / "checkpoints" / file.name, weights_only=True) for d in (a, b))
            old, new = (s.get("state_dict", s) for s in (old, new))
            same = old.keys() == new.keys() and all(torch.equal(old[k], new[k]) for k in old)
            print(f"{name}/{file.name}: {'identical' if same else 'DIFFERENT'} ({len(old)} tensors)")
            differences += not same
    print("identical" if not differences else f"{differences} difference(s)")
    return int(differences > 0)


if __name__ == "__main__":
    if sys.argv[1:2] == ["run"] and len(sys.argv) == 3:
        run(Path(sys.argv[2]).resolve())
    elif sys.argv[1:2] == ["compare"] and len(sys.argv) == 4:
        sys.exit(compare(Path(sys.argv[2]), Path(sys.argv[3])))
    else:
        sys.exit(__doc__)
