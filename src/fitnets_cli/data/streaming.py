"""Image files streamed to the device: a loader worker decodes an item (a file path, or (split, index) of a
torchvision dataset) into a uint8 C,H,W tensor, the evaluation view (shorter side resized, centre crop) or,
with a seed, a random-resized crop drawn from that seed alone, so that a resumed run, or another number of
ranks, cuts the same crops; `Streamed` batches them onto the device like a resident split."""

import math
import random
import signal

import numpy as np
import torch
from PIL import Image

from fitnets_cli.config.errors import ConfigError
from fitnets_cli.config.groups import Data, Dataset
from fitnets_cli.runtime import dist


def crop_box(rng: random.Random, width: int, height: int, scale, ratio) -> tuple[int, int, int, int]:
    """(left, top, width, height) of a random-resized crop, as torchvision's RandomResizedCrop draws it."""
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < w <= width and 0 < h <= height:
            return rng.randint(0, width - w), rng.randint(0, height - h), w, h
    aspect = width / height   # fallback: the whole image, its aspect clamped to the range
    w, h = (width, round(width / ratio[0])) if aspect < ratio[0] else \
        (round(height * ratio[1]), height) if aspect > ratio[1] else (width, height)
    w, h = min(w, width), min(h, height)
    return (width - w) // 2, (height - h) // 2, w, h


class Files(torch.utils.data.Dataset):
    """Items decoded into uint8 C,H,W tensors of the input shape. A key is (index, seed): seed None gives the
    evaluation view, else a random-resized crop drawn from the seed and the index alone."""

    def __init__(self, reader, items: list, labels: list, shape, images):
        self.reader, self.items, self.labels = reader, items, labels
        self.shape, self.images = tuple(shape), images

    def __len__(self):
        return len(self.items)

    def view(self, image: Image.Image, seed) -> Image.Image:
        c, h, w = self.shape
        image = image.convert("L" if c == 1 else "RGB")
        if seed is not None:
            left, top, cw, ch = crop_box(random.Random(seed), *image.size, self.images.crop_scale,
                                         self.images.crop_ratio)
            return image.resize((w, h), Image.BILINEAR, box=(left, top, left + cw, top + ch))
        if image.size == (w, h):
            return image
        side = self.images.resize or max(h, w)
        scale = side / min(image.size)
        image = image.resize((max(w, round(image.size[0] * scale)), max(h, round(image.size[1] * scale))),
                             Image.BILINEAR)
        left, top = (image.size[0] - w) // 2, (image.size[1] - h) // 2
        return image.crop((left, top, left + w, top + h))

    def __getitem__(self, key):
        i, seed = key
        try:
            with self.reader.open(self.items[i]) as image:
                x = np.asarray(self.view(image, None if seed is None else seed * 1_000_003 + i), dtype=np.uint8)
        except Exception as err:   # decoding fails in many ways on damaged files; see data.bad_images
            reason = f"{type(err).__name__}: {str(err).splitlines()[0][:100]}" if str(err) else type(err).__name__
            return None, self.labels[i], i, (str(self.items[i]), reason)
        x = torch.from_numpy(x.copy())
        return (x[None] if x.dim() == 2 else x.permute(2, 0, 1)), self.labels[i], i, None

    def collate(self, samples):
        """A batch (uint8 images, labels, indices, [(item, reason) of the images that failed to decode])."""
        good = [s for s in samples if s[3] is None]
        x = torch.stack([s[0] for s in good]) if good else torch.empty((0, *self.shape), dtype=torch.uint8)
        return (x, torch.tensor([s[1] for s in good], dtype=torch.long),
                torch.tensor([s[2] for s in good], dtype=torch.long), [s[3] for s in samples if s[3] is not None])


def ignore_interrupts(worker: int) -> None:
    """A loader worker leaves SIGINT (a Ctrl-C reaches the whole process group) to the main process, which stops
    after the current step with a checkpoint, then ends the workers. (SIGTERM still ends a worker: the main
    process's own exit terminates its workers with it.)"""
    signal.signal(signal.SIGINT, signal.SIG_IGN)


class Plan(torch.utils.data.Sampler):
    """The loader's batches of keys, set before each pass: persistent workers serve one plan after another."""

    def __init__(self):
        self.batches = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return len(self.batches)


class Streamed:
    """A split of image files read by loader workers (decoded and cropped there), then moved to the device and
    normalised there. Under torchrun each rank reads its own share of every batch."""

    def __init__(self, files: Files, device, data: Data, mean, std, skipped: set | None = None):
        self.files, self.device, self.data = files, torch.device(device), data
        self.mean_std = mean, std
        c = files.shape[0]
        self.mean = torch.tensor(mean or [0.0] * c, device=self.device).view(1, c, 1, 1)
        self.std = torch.tensor(std or [1.0] * c, device=self.device).view(1, c, 1, 1)
        self.skipped = set() if skipped is None else skipped   # images that failed to decode (bad_images=skip)
        self.plan = Plan()
        workers = data.workers
        # A generator of its own: a loader's iterator draws its base seed from it, never from the run's RNG.
        self.loader = torch.utils.data.DataLoader(
            files, batch_sampler=self.plan, num_workers=workers, collate_fn=files.collate,
            pin_memory=self.device.type == "cuda", persistent_workers=workers > 0,
            prefetch_factor=data.prefetch if workers else None, generator=torch.Generator(),
            worker_init_fn=ignore_interrupts)

    def __len__(self):
        return len(self.files)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor(self.files.labels, dtype=torch.long)

    def __add__(self, other: "Streamed") -> "Streamed":
        return self._with(self.files.items + other.files.items, self.files.labels + other.files.labels)

    def subset(self, index) -> "Streamed":
        return self._with([self.files.items[i] for i in index], [self.files.labels[i] for i in index])

    def _with(self, items, labels) -> "Streamed":
        f = self.files
        return Streamed(Files(f.reader, items, labels, f.shape, f.images), self.device, self.data, *self.mean_std,
                        self.skipped)

    def batches(self, batch_size: int, order=None, start: int = 0, stop=None, crop_seed=None, train: bool = False):
        """(x, y, idx, global batch size) of this rank's share of each batch of `order` (default: in order) from
        batch `start` to `stop`; with `crop_seed`, random-resized crops drawn from it."""
        order = torch.arange(len(self)) if order is None else order.cpu()
        chunks = [b for b in order.split(batch_size)[start:stop] if not train or len(b) >= dist.world()]
        self.plan.batches = [[(i, crop_seed) for i in dist.shard(b).tolist()] for b in chunks]
        for chunk, (x, y, idx, bad) in zip(chunks, self.loader):
            for item, reason in bad:
                if self.data.bad_images == "stop":
                    raise ConfigError(f"{item} cannot be decoded ({reason}); replace or remove it, or set "
                                      "data.bad_images=skip to leave out images that fail to decode")
                self.skipped.add(item)
            x = x.to(self.device, non_blocking=True).float().div_(255)
            yield (x - self.mean) / self.std, y.to(self.device, non_blocking=True), idx.to(self.device), len(chunk)

    def decode_all(self) -> torch.Tensor:
        """Every image's evaluation view, normalised, as one float tensor on the device (the resident path)."""
        n = len(self)
        out = torch.empty((n, *self.files.shape), device=self.device)
        order = torch.arange(n)
        self.plan.batches = [[(i, None) for i in b.tolist()] for b in order.split(256)]
        for x, y, idx, bad in self.loader:
            if bad:
                item, reason = bad[0]
                raise ConfigError(f"{item} cannot be decoded ({reason}); replace or remove it")
            out[idx.to(self.device)] = (x.to(self.device).float().div_(255) - self.mean) / self.std
        return out


def decoded_gib(dataset: Dataset, n: int) -> float:
    """The size of n images of the input shape as float32 tensors, in GiB."""
    return n * math.prod(dataset.in_shape) * 4 / 2**30
