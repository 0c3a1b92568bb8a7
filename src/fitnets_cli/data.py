"""Datasets as splits that yield batches: tensors on the training device (torchvision loaders, the paper's
preprocessing cached on disk, batched augmentation there), or image files streamed by loader workers
(images.py finds and checks them, streaming.py streams them); a seeded stratified validation split."""

import io
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from fitnets_cli import dist
from fitnets_cli.checkpoint import DiskFull, atomic_write
from fitnets_cli.config import Augment, ConfigError
from fitnets_cli.ui import console


class Resident:
    """A split held as one float tensor on the device (every built-in dataset, and small image datasets):
    batches are its rows, picked by index there."""

    def __init__(self, x, y):
        self.x, self.y = x, y

    def __len__(self):
        return len(self.y)

    @property
    def labels(self):
        return self.y

    def __add__(self, other: "Resident") -> "Resident":
        return Resident(torch.cat([self.x, other.x]), torch.cat([self.y, other.y]))

    def batches(self, batch_size: int, order=None, start: int = 0, stop=None, crop_seed=None, train: bool = False):
        """(x, y, idx, global batch size) of this rank's share of each batch of `order` (default: in order) from
        batch `start` to `stop`; in training, a last batch too small to give every rank an image is skipped."""
        order = torch.arange(len(self), device=self.x.device) if order is None else order
        for batch in order.split(batch_size)[start:stop]:
            if train and len(batch) < dist.world():
                continue
            idx = dist.shard(batch)   # this rank's share of the global batch
            yield self.x[idx], self.y[idx], idx, len(batch)


@dataclass
class Splits:
    train: object          # Resident or streaming.Streamed
    valid: object | None   # None: no validation split (valid_size 0)
    test: object


def load_data(dataset, data, device, augment: Augment | None = None) -> Splits:
    """Load, preprocess and split a dataset, held on `device` or, for image files, streamed to it."""
    if dataset.images is not None:
        return _load_files(dataset, data, device, augment or dataset.augment)
    if data.resident == "false":
        raise ConfigError(f"dataset={dataset.name} is held on the device whole; to stream a torchvision dataset "
                          "use dataset=torchvision dataset.images.cls=NAME")
    raw = _load_raw(dataset, data)
    images = _preprocess(raw, dataset, data)
    pools = [("train", int(dataset.valid_size))]
    if dataset.extra:
        # Goodfellow et al.'s SVHN split: 400 per class from train and 200 per class from extra.
        from_train = dataset.valid_size * 2 // 3
        pools = [("train", from_train), ("extra", dataset.valid_size - from_train)]
    train, valid = [], []
    for i, (pool, size) in enumerate(pools):
        labels = raw[pool][1]
        if data.valid_split == "last":
            keep, held = last_split(len(labels), size)
        else:
            keep, held = stratified_split(labels, size, dataset.num_classes, data.split_seed + i)
        train.append((images[pool][keep], labels[keep]))
        valid.append((images[pool][held], labels[held]))
    to = lambda parts: Resident(*(torch.cat(t).to(device) for t in zip(*parts)))
    return Splits(train=to(train), valid=to(valid) if dataset.valid_size else None,
                  test=Resident(images["test"].to(device), raw["test"][1].to(device)))


def _load_files(dataset, data, device, augment: Augment) -> Splits:
    """Image files: validation from val/ or held out of train/, test from test/ (else val/, else the held-out
    validation images); held on the device when data.resident says so, else streamed."""
    from fitnets_cli import images, streaming   # PIL and the loaders: only image files need them

    found = images.listing(dataset, data)
    files = lambda split: streaming.Files(found.reader, *found.splits[split], dataset.in_shape, dataset.images)
    stream = lambda f: streaming.Streamed(f, device, data, dataset.images.mean, dataset.images.std)
    train = stream(files("train"))
    if "val" in found.splits:
        valid = stream(files("val"))
    elif dataset.valid_size:
        keep, held = held_out(train.labels, dataset.valid_size, found.classes, data.split_seed)
        train, valid = train.subset(keep.tolist()), train.subset(held.tolist())
    else:
        valid = None
    test = stream(files("test")) if "test" in found.splits else valid
    if test is None:
        raise ConfigError(f"{data.root} has no val/ or test/ folder and dataset.valid_size=0 holds nothing out: add "
                          "val/<class>/ images or set dataset.valid_size (a count, or a fraction such as 0.1)")
    if test is valid and "val" not in found.splits:
        console.print(f"no val/ or test/ folder: {len(valid)} images held out of train/ (dataset.valid_size) "
                      "serve as validation and test")
    n = sum(len(s) for s in {id(s): s for s in (train, valid, test) if s is not None}.values())
    gib = streaming.decoded_gib(dataset, n)
    if data.resident == "true" or (data.resident == "auto" and not augment.resized_crop and gib <= data.resident_gb):
        console.print(f"decoding {n} images onto the device ({gib:.2f} GiB; data.resident={data.resident})")
        held = {id(s): Resident(s.decode_all(), s.labels.to(device)) for s in (train, valid, test) if s is not None}
        pick = lambda s: None if s is None else held[id(s)]
        return Splits(pick(train), pick(valid), pick(test))
    return Splits(train, valid, test)


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


def augment(x, pad: int, flip: bool):
    """Zero-pad by `pad`, crop a random window of the original size, flip half the images horizontally.

    Batched on the images' device; each image draws its own offsets and flip.
    """
    n, c, h, w = x.shape
    if pad:
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device)
        dx = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device)
        rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]
        x = padded[torch.arange(n, device=x.device)[:, None, None, None],
                   torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
    if flip:
        flipped = torch.rand(n, device=x.device) < 0.5
        x = torch.where(flipped[:, None, None, None], x.flip(3), x)
    return x


# ---------------------------------------------------------------- raw images, as uint8 N,C,H,W

# Where torchvision looks for each dataset's files under data.root.
FOLDERS = {"mnist": "MNIST/raw", "cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python", "svhn": "."}


def _load_raw(dataset, data) -> dict:
    root = data.root
    if dataset.name == "mnist_subset":
        with resources.files("fitnets_cli").joinpath("assets/mnist_subset.npz").open("rb") as f:
            arrays = np.load(io.BytesIO(f.read()))
        return {s: (torch.from_numpy(arrays[f"{s}_x"]).unsqueeze(1), torch.from_numpy(arrays[f"{s}_y"]).long())
                for s in ("train", "test")}
    if dataset.name not in FOLDERS:
        raise ConfigError(f"dataset.name={dataset.name!r} has no loader; use mnist, mnist_subset, cifar10, "
                          "cifar100 or svhn")
    import torchvision   # a second to import: only the datasets read from files need it

    try:
        if dataset.name == "mnist":
            return {s: _mnist(torchvision.datasets.MNIST(root, train=s == "train", download=data.download))
                    for s in ("train", "test")}
        if dataset.name in ("cifar10", "cifar100"):
            cls = torchvision.datasets.CIFAR10 if dataset.name == "cifar10" else torchvision.datasets.CIFAR100
            return {s: _cifar(cls(root, train=s == "train", download=data.download)) for s in ("train", "test")}
        splits = ("train", "test", "extra") if dataset.extra else ("train", "test")
        return {s: _svhn(torchvision.datasets.SVHN(root, split=s, download=data.download)) for s in splits}
    except Exception as err:   # missing, truncated or garbled files fail in many ways inside torchvision
        reason = f"{type(err).__name__}: {str(err).strip()}".splitlines()[0][:160].rstrip(": ")
        raise ConfigError(f"dataset {dataset.name} is missing or unreadable in {Path(root) / FOLDERS[dataset.name]} "
                          f"({reason}); place intact files there (torchvision's layout), or delete them and pass "
                          "data.download=true") from None


def _mnist(ds):
    return ds.data.unsqueeze(1), ds.targets.long()


def _cifar(ds):
    return torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.tensor(ds.targets)


def _svhn(ds):
    return torch.from_numpy(ds.data), torch.from_numpy(ds.labels).long()


# ---------------------------------------------------------------- preprocessing

def _preprocess(raw: dict, dataset, data) -> dict:
    images = _paper_preprocess(raw, dataset, data)
    return standardize(images, images["train"]) if dataset.normalize else images


def _paper_preprocess(raw: dict, dataset, data) -> dict:
    if dataset.preprocess == "scale":
        return {s: x.float() / 255 for s, (x, _) in raw.items()}
    key = f"{dataset.name}-{dataset.preprocess}-gcn{dataset.gcn_scale:g}"
    key += f"-zca{dataset.zca_bias:g}" if dataset.preprocess == "gcn_zca" else ""
    key += "-extra" if dataset.extra else ""
    cache = Path(data.cache or Path(data.root) / "fitnets_cache") / f"{key}.pt"
    if cache.exists():
        try:
            return torch.load(cache)
        except Exception:   # a damaged cache is recomputed, never trusted
            console.print(f"preprocessing cache {cache} is unreadable; recomputing it")
    images = {s: gcn(x.float(), dataset.gcn_scale) for s, (x, _) in raw.items()}
    if dataset.preprocess == "gcn_zca":
        # Fit on all training images (valid included), as pylearn2's make_cifar10_gcn_whitened.py.
        mean, whiten = zca_fit(images["train"], dataset.zca_bias)
        images = {s: zca_apply(x, mean, whiten) for s, x in images.items()}
    else:
        images = {s: lecun_lcn(x) for s, x in images.items()}
    try:
        atomic_write(cache, lambda tmp: torch.save(images, tmp))
    except (OSError, DiskFull) as err:
        reason = "the disk is full" if isinstance(err, DiskFull) else err.strerror
        console.print(f"could not cache the preprocessed data at {cache} ({reason}); "
                      "set data.cache=DIR to a writable folder to skip this work next time")
    return images


def gcn(x, scale: float):
    """Global contrast normalisation: per image, subtract its mean, divide by its L2 norm, times `scale`."""
    flat = x.flatten(1)
    flat = flat - flat.mean(1, keepdim=True)
    norm = flat.norm(dim=1, keepdim=True).clamp_min(1e-8)
    return (scale * flat / norm).view_as(x)


def standardize(images: dict, train) -> dict:
    """Per channel, subtract the training images' mean and divide by their standard deviation (the CRD
    benchmark normalises CIFAR-100 so, with fixed constants; here they are computed from the images)."""
    std, mean = torch.std_mean(train, dim=(0, 2, 3), keepdim=True)
    return {s: (x - mean) / std for s, x in images.items()}


def zca_fit(x, bias: float, batch: int = 5000):
    """ZCA whitening fit: per-feature mean and P = V diag(1/sqrt(eig)) V^T of cov + bias*I.
    Accumulated in float64 over batches, so no float64 copy of the whole dataset is ever held."""
    flat = x.flatten(1)
    chunks = lambda: (flat[i:i + batch].double() for i in range(0, len(flat), batch))
    mean = sum(c.sum(0) for c in chunks()) / len(flat)
    cov = sum((c - mean).T @ (c - mean) for c in chunks()) / len(flat)
    cov += bias * torch.eye(flat.shape[1], dtype=cov.dtype)
    eig, vec = torch.linalg.eigh(cov)
    return mean.float(), (vec @ torch.diag(eig.rsqrt()) @ vec.T).float()


def zca_apply(x, mean, whiten, batch: int = 10000):
    """Apply a ZCA fit, in batches to bound memory."""
    flat = x.flatten(1)
    out = torch.cat([(flat[i:i + batch] - mean) @ whiten for i in range(0, len(flat), batch)])
    return out.view_as(x)


def lecun_lcn(x, kernel: int = 7, threshold: float = 1e-4, batch: int = 10000):
    """LeCun local contrast normalisation per channel, as pylearn2's lecun_lcn (Gaussian sigma 2)."""
    mid = kernel // 2
    grid = torch.arange(kernel, dtype=torch.float32) - mid
    g = torch.exp(-(grid[:, None] ** 2 + grid[None, :] ** 2) / (2 * 2.0 ** 2))
    c = x.shape[1]
    w = (g / g.sum()).expand(c, 1, kernel, kernel)
    out = []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        centred = xb - F.conv2d(xb, w, padding=mid, groups=c)
        denom = F.conv2d(xb ** 2, w, padding=mid, groups=c).sqrt()
        divisor = torch.maximum(denom.mean((2, 3), keepdim=True), denom).clamp_min(threshold)
        out.append(centred / divisor)
    return torch.cat(out)


def batches(n: int, batch_size: int, device, shuffle: bool = True):
    """Index tensors covering range(n) in batches, in a fresh random order when `shuffle`."""
    order = torch.randperm(n, device=device) if shuffle else torch.arange(n, device=device)
    return order.split(batch_size)
