"""A dataset's splits as the training loop reads them: `Resident` holds a split as one tensor on the device and
serves its batches by index there (streaming.Streamed serves image files the same way); seeded train/validation
splits."""

from dataclasses import dataclass

import torch

from fitnets_cli.config.errors import ConfigError
from fitnets_cli.data.views import resize
from fitnets_cli.runtime import dist


class Resident:
    """A split held as one float tensor on the device (every built-in dataset, and small image datasets):
    batches are its rows, picked by index there and, with `side` (dataset.resize), resized there to side x side,
    a batch at a time: `x` keeps the images' own size, so read inputs through `rows`."""

    def __init__(self, x, y, side: int | None = None):
        self.x, self.y, self.side = x, y, side

    def __len__(self):
        return len(self.y)

    @property
    def labels(self):
        return self.y

    @property
    def device(self):
        return self.x.device

    def rows(self, idx):
        """The networks' inputs of the images at `idx`: x[idx], resized to side x side where a side is set."""
        x = self.x[idx]
        return x if self.side is None else resize(x, self.side)

    def __add__(self, other: "Resident") -> "Resident":
        assert self.side == other.side, (self.side, other.side)
        return Resident(torch.cat([self.x, other.x]), torch.cat([self.y, other.y]), self.side)

    def batches(self, batch_size: int, order=None, start: int = 0, stop=None, crop_seed=None, train: bool = False):
        """(x, y, idx, global batch size) of this rank's share of each batch of `order` (default: in order) from
        batch `start` to `stop`; in training, a last batch too small to give every rank an image is skipped."""
        order = torch.arange(len(self), device=self.device) if order is None else order
        for batch in order.split(batch_size)[start:stop]:
            if train and len(batch) < dist.world():
                continue
            idx = dist.shard(batch)   # this rank's share of the global batch
            yield self.rows(idx), self.y[idx], idx, len(batch)

@dataclass
class Splits:
    train: object          # Resident or streaming.Streamed
    valid: object | None   # None: no validation split (valid_size 0)
    test: object

def held_counts(labels, size, classes: list[str]) -> list[int]:
    """How many training images of each class `held_out` holds out for validation: `size` is a count spread
    evenly over the classes or a fraction of each. Raises ConfigError where that leaves no validation image or a
    class without training images."""
    counts = [int((torch.as_tensor(labels) == c).sum()) for c in range(len(classes))]
    if isinstance(size, int):
        quotas = [size // len(classes) + (c < size % len(classes)) for c in range(len(classes))]
    else:
        quotas = [round(size * n) for n in counts]
    fix = "add val/<class>/ images, or set dataset.valid_size to a count or another share"
    if not sum(quotas):
        raise ConfigError(f"dataset.valid_size={size} holds out no image of the {sum(counts)} in train/ "
                          f"(classes of {min(counts)} to {max(counts)} images); {fix}")
    for name, n, quota in zip(classes, counts, quotas):
        if n - quota < 1:
            raise ConfigError(f"dataset.valid_size={size} would hold out {quota} of the {n} image(s) of class {name!r}, "
                              f"leaving none to train on; {fix}")
    return quotas

def held_out(labels, size, classes: list[str], seed: int):
    """Indices (kept, held out): `size` images (a count, spread evenly over classes) or a fraction of each class."""
    if isinstance(size, int):
        return stratified_split(labels, size, len(classes), seed)
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    held = torch.cat([perm[labels[perm] == c][:quota] for c, quota in enumerate(held_counts(labels, size, classes))])
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held] = False
    return mask.nonzero().squeeze(1), held.sort().values

def last_split(n: int, size: int):
    """Indices (kept, held out) with the last `size` of n held out, as the authors' yamls split."""
    if size > n:
        raise ConfigError(f"dataset.valid_size={size} is more than the {n} training images; lower it")
    return torch.arange(n - size), torch.arange(n - size, n)

def stratified_split(labels, size: int, num_classes: int, seed: int):
    """Indices (kept, held out) with `size` held out, spread evenly over classes, chosen by `seed`."""
    perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(seed))
    held = []
    for c in range(num_classes):
        quota = size // num_classes + (c < size % num_classes)
        of_class = perm[labels[perm] == c]
        if len(of_class) < quota:
            raise ConfigError(f"dataset.valid_size={size} needs {quota} images of class {c}, "
                              f"the data has {len(of_class)}; lower dataset.valid_size")
        held.append(of_class[:quota])
    held = torch.cat(held) if held else torch.empty(0, dtype=torch.long)
    mask = torch.ones(len(labels), dtype=torch.bool)
    mask[held] = False
    return mask.nonzero().squeeze(1), held.sort().values

def batches(n: int, batch_size: int, device, shuffle: bool = True):
    """Index tensors covering range(n) in batches, in a fresh random order when `shuffle`."""
    order = torch.randperm(n, device=device) if shuffle else torch.arange(n, device=device)
    return order.split(batch_size)
