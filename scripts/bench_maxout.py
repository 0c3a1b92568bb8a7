"""The students' forward and backward (batch 128) with autograd's amax as the maxout, against
models.Maxout, alternating in one process (the machine may be noisy), in fp32 and under bf16 autocast.

  python scripts/bench_maxout.py [--rounds 2]
"""

import argparse
import time

import torch

from fitnets_cli.commands.compare import load_student
from fitnets_cli.networks import maxout as models

SHAPES = {"fitnet_mnist": (1, 28, 28), "fitnet4": (3, 32, 32)}


def best_ms(step, repeats=5) -> float:
    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    maxouts = {"amax": lambda z: z.amax(2), "Maxout": models.Maxout.apply}
    for student, shape in SHAPES.items():
        net = models.build_net(load_student(student).layers, shape, 10, 0.05)
        x = torch.randn(128, *shape)
        for amp in (False, True):
            for _ in range(args.rounds):
                for name, maxout in maxouts.items():
                    models.Maxout.apply = maxout
                    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
                        ms = best_ms(lambda: net(x).float().sum().backward())
                    print(f"{student} {'bf16' if amp else 'fp32'} {name}: {ms:.1f} ms", flush=True)


if __name__ == "__main__":
    main()
