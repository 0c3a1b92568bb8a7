"""Write the MNIST subset shipped with the package (src/fitnets_cli/assets/mnist_subset.npz).

A stratified, seeded draw from the official MNIST files: 500 training and 100 test images per class.
Usage: python scripts/make_mnist_subset.py [--root DATA] [--out src/fitnets_cli/assets/mnist_subset.npz]
"""

import argparse

import numpy as np
import torch
import torchvision

PER_CLASS = {"train": 500, "test": 100}


def draw(ds, per_class: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(ds.targets), generator=g)
    idx = torch.cat([perm[ds.targets[perm] == c][:per_class] for c in range(10)]).sort().values
    return ds.data[idx].numpy(), ds.targets[idx].numpy().astype(np.uint8)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--root", default="data", help="folder holding MNIST/raw (the official IDX files)")
    parser.add_argument("--out", default="src/fitnets_cli/assets/mnist_subset.npz")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    arrays = {}
    for split, per_class in PER_CLASS.items():
        ds = torchvision.datasets.MNIST(args.root, train=split == "train", download=False)
        arrays[f"{split}_x"], arrays[f"{split}_y"] = draw(ds, per_class, args.seed)
    np.savez_compressed(args.out, **arrays)
    print(f"wrote {args.out}: " + ", ".join(f"{k} {v.shape}" for k, v in arrays.items()))


if __name__ == "__main__":
    main()
