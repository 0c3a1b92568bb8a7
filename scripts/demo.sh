#!/usr/bin/env sh
# The main job on the shipped MNIST subset (no download): the maxout teacher, the MNIST FitNet trained
# with hints + KD, the same student by plain backprop from three seeds, then the student-vs-teacher table
# and, per run, the first epoch that reached 90% validation accuracy; last, the FitNet as a file to ship
# (torch.export's pt2), checked against its checkpoint.
set -eu
FITNETS=${FITNETS:-fitnets}
PYTHON=${PYTHON:-python3}
OUT=${DEMO_DIR:-runs/demo/$(date +%Y-%m-%d_%H-%M-%S)}
common="dataset=mnist_subset teacher_store=$OUT/teachers"
$FITNETS train-teacher $common hydra.run.dir=$OUT/teacher
$FITNETS train $common student=fitnet_mnist schedule=fitnets hydra.run.dir=$OUT/fitnet
$FITNETS train -m $common student=fitnet_mnist schedule=backprop seed=0,1,2 hydra.sweep.dir=$OUT/backprop
$FITNETS compare runs=$OUT
# When backprop from the paper's tiny initialisation leaves chance level depends on the seed and on the
# CPU's floating-point kernels; the hints' head start does not.
"$PYTHON" - $OUT/teacher $OUT/fitnet $OUT/backprop/*/ <<'EOF'
import json, sys
from pathlib import Path

print("first epoch at 90% validation accuracy or more (epochs of all stages counted):")
for run in sys.argv[1:]:
    m = json.loads((Path(run) / "metrics.json").read_text())
    epochs = [(stage["name"], i, h) for stage in m["stages"] for i, h in enumerate(stage["history"], 1)]
    first = next((n for n, (_, _, h) in enumerate(epochs, 1) if h.get("valid_acc", 0) >= 0.9), None)
    where = f"epoch {first} of {len(epochs)} ({epochs[first - 1][0]} stage, its epoch {epochs[first - 1][1]})" \
        if first else f"never, in {len(epochs)} epochs"
    print(f"  {m['model']} {m['schedule']}, seed {m['seed']}: {where}")
EOF
$FITNETS export checkpoint=$OUT/fitnet/checkpoints/student.pt format=pt2
