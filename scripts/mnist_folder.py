"""Write MNIST's IDX files (torchvision's layout, ROOT/MNIST/raw) out as an image folder of PNGs, for the
streaming path's real-data check (docs/performance.md): OUT/train/<digit>/<index>.png (60,000 images) and
OUT/test/<digit>/<index>.png (10,000), the index being the image's place in its file.

  python scripts/mnist_folder.py ROOT OUT
"""

import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import torchvision
from PIL import Image


def write(job):
    out, images, labels, start = job
    for i, (image, label) in enumerate(zip(images, labels), start):
        Image.fromarray(image).save(out / str(label) / f"{i:05d}.png")


def main(root: str, out: str) -> None:
    for split, train in (("train", True), ("test", False)):
        ds = torchvision.datasets.MNIST(root, train=train, download=False)
        folder = Path(out) / split
        for digit in range(10):
            (folder / str(digit)).mkdir(parents=True, exist_ok=True)
        images, labels = ds.data.numpy(), ds.targets.tolist()
        chunk = 5000
        with ProcessPoolExecutor() as pool:
            list(pool.map(write, [(folder, images[i:i + chunk], labels[i:i + chunk], i)
                                  for i in range(0, len(labels), chunk)]))
        print(f"{split}: {len(labels)} PNGs in {folder}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
