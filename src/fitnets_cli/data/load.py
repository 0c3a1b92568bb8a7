"""Datasets as splits that yield batches: tensors on the training device (torchvision's readers, the paper's
preprocessing), or image files streamed by loader workers (images.py finds and checks them, streaming.py streams
them)."""

import io
from importlib import resources
from pathlib import Path

import numpy as np
import torch

from fitnets_cli.config.errors import ConfigError
from fitnets_cli.config.groups import Augment
from fitnets_cli.data.preprocess import preprocess
from fitnets_cli.data.splits import Resident, Splits, held_out, last_split, stratified_split
from fitnets_cli.runtime.ui import console


def load_data(dataset, data, device, augment: Augment | None = None) -> Splits:
    """Load, preprocess and split a dataset, held on `device` or, for image files, streamed to it."""
    if dataset.images is not None:
        return _load_files(dataset, data, device, augment or dataset.augment)
    if data.resident == "false":
        raise ConfigError(f"dataset={dataset.name} is held on the device whole; to stream a torchvision dataset "
                          "use dataset=torchvision dataset.images.cls=NAME")
    raw = _load_raw(dataset, data)
    images = preprocess(raw, dataset, data)
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
    # dataset.resize: each batch is resized on the device as it is read, never the whole split at once.
    to = lambda parts: Resident(*(torch.cat(t).to(device) for t in zip(*parts)), side=dataset.resize)
    return Splits(train=to(train), valid=to(valid) if dataset.valid_size else None,
                  test=Resident(images["test"].to(device), raw["test"][1].to(device), side=dataset.resize))

def _load_files(dataset, data, device, augment: Augment) -> Splits:
    """Image files: validation from val/ or held out of train/, test from test/ (else val/, else the held-out
    validation images); held on the device when data.resident says so, else streamed."""
    from fitnets_cli.data import images   # PIL and the loaders: only image files need them
    from fitnets_cli.data import streaming

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
