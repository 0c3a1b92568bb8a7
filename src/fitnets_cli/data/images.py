"""Datasets of image files: found and checked before a run writes anything, then held on the device (small
ones, as every built-in dataset is) or streamed through loader workers.

Readers (dataset.images.reader):
  folder       torchvision's ImageFolder layout: data.root/train/<class>/<image>, and optionally val/ and test/
  imagenet     torchvision's ImageNet: its archives under data.root, extracted on first use, or the train/ and
               val/ folders and meta.bin they extract to
  torchvision  any torchvision.datasets class by name, with its keyword arguments

Each gives, per split, items (file paths, or (split, index) of a torchvision dataset) and labels, which
streaming.py decodes on loader workers.
"""

import difflib
import inspect
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from fitnets_cli.config.commands import Common
from fitnets_cli.config.errors import ConfigError
from fitnets_cli.config.groups import Data, Dataset
from fitnets_cli.data.splits import held_counts
from fitnets_cli.runtime.ui import console

EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")   # torchvision's own list
GREY = ("1", "L", "LA", "La", "I", "I;16", "F", "P;L")   # PIL modes read as one channel (alpha dropped)


@dataclass
class Listing:
    """What a dataset's files hold: class names, per split (train, and val / test where there are such)
    (items, labels), the input shape (C, H, W), and how to open an item."""
    classes: list
    splits: dict
    shape: tuple
    reader: object = None
    notes: list = field(default_factory=list)


def channels_of(mode: str) -> int:
    return 1 if mode in GREY else 3


class FileReader:
    """Opens image files by path."""

    def open(self, item) -> Image.Image:
        return Image.open(item)


class DatasetReader:
    """Opens the images of torchvision datasets: item (split, index) -> the image of dataset[index]."""

    def __init__(self, sets: dict):
        self.sets = sets

    def open(self, item) -> Image.Image:
        image = self.sets[item[0]][item[1]][0]
        if isinstance(image, torch.Tensor):
            image = image.numpy().transpose(1, 2, 0).squeeze(2) if image.dim() == 3 else image.numpy()
        return image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image))


_FOUND = {}   # the scans of this process: the check before a run and the run itself share one


def stamp(root: Path) -> tuple:
    """When the entries of the split folders and their class folders last changed (stat calls only): a scan is
    reused only while these stay the same."""
    folders = [root / split for split in ("train", "val", "test") if (root / split).is_dir()]
    folders += [d for f in folders for d in f.iterdir() if d.is_dir()]
    return tuple((str(f), f.stat().st_mtime_ns) for f in folders)


def listing(dataset: Dataset, data: Data) -> Listing:
    """The dataset's files, scanned once per process and again when a folder's entries change; bad input raises
    ConfigError naming the file or folder."""
    images = dataset.images
    key = (images.reader, str(data.root), images.cls, repr(images.kwargs), images.size, images.channels,
           stamp(Path(data.root)) if images.reader == "folder" and Path(data.root).is_dir() else ())
    if key not in _FOUND:
        root = Path(data.root)
        if images.reader == "torchvision":
            found = _torchvision(dataset, data)
        else:
            if images.reader == "imagenet":
                _prepare_imagenet(root)
            found = _folders(root, images)
        for note in found.notes:
            console.print(note)
        _FOUND[key] = found
    return _FOUND[key]


def resolve(cfg: Common) -> Common:
    """The config with the dataset's input shape and class count taken from its image files (checked on the way);
    other configs unchanged."""
    ds = cfg.dataset
    if ds is None or ds.images is None:
        return cfg
    found = listing(ds, cfg.data)
    if ds.num_classes is not None and ds.num_classes != len(found.classes):
        raise ConfigError(f"dataset.num_classes={ds.num_classes} but {cfg.data.root} holds {len(found.classes)} "
                          "classes; leave num_classes unset to take it from the data")
    if len(found.classes) < 2:
        raise ConfigError(f"{cfg.data.root} holds one class ({found.classes[0]}); a classifier needs two or more "
                          "class folders")
    if "val" not in found.splits and ds.valid_size:
        held_counts(found.splits["train"][1], ds.valid_size, found.classes)   # raises where the share is too small
    if ds.in_shape is not None and tuple(ds.in_shape) != tuple(found.shape):
        raise ConfigError(f"dataset.in_shape={list(ds.in_shape)} but the images give {list(found.shape)}; set "
                          "dataset.images.size and dataset.images.channels instead, and leave in_shape unset")
    recipe = getattr(cfg, "recipe", None)   # the training commands'
    optims = [recipe.student, recipe.teacher] if recipe else []
    if cfg.data.resident == "true" and any((o.augment or ds.augment).resized_crop for o in optims):
        raise ConfigError("random-resized crops are cut from the image files by the loader workers, and "
                          "data.resident=true holds decoded images; set data.resident=auto or false, or "
                          "dataset.augment.resized_crop=false")
    if ds.images.mean and len(ds.images.mean) != found.shape[0]:
        raise ConfigError(f"dataset.images.mean and std have {len(ds.images.mean)} values for "
                          f"{found.shape[0]}-channel images; give one per channel")
    return replace(cfg, dataset=replace(ds, in_shape=list(found.shape), num_classes=len(found.classes)))


# ---------------------------------------------------------------- readers

def _folders(root: Path, images) -> Listing:
    if not root.is_dir():
        raise ConfigError(f"data.root={root} is not a folder; pass data.root=DIR holding train/<class>/<images> "
                          "(torchvision's ImageFolder layout)")
    train = root / "train"
    if not train.is_dir():
        raise ConfigError(f"{root} has no train/ folder; put the training images in {train}/<class>/ (one folder "
                          "per class), and held-out ones in val/<class>/")
    classes = _class_folders(train)
    if not classes:
        raise ConfigError(f"{train} holds no class folders; put each class's images in {train}/<class>/")
    splits = {"train": _files(train, classes, classes)}
    for name in ("val", "test"):
        if (root / name).is_dir():
            held = _class_folders(root / name)
            if not held:
                raise ConfigError(f"{root / name} holds no class folders; put its images in {root / name}/<class>/ "
                                  "or remove it")
            foreign = [c for c in held if c not in classes]
            if foreign:
                raise ConfigError(f"{root / name / foreign[0]}: class {foreign[0]!r} has no folder in {train}; "
                                  "rename it to a training class or remove it")
            splits[name] = _files(root / name, held, classes)
    shape, notes = _shape(splits, images)
    return Listing(classes, splits, shape, FileReader(), notes)


def _class_folders(folder: Path) -> list[str]:
    return sorted(d.name for d in folder.iterdir() if d.is_dir() and not d.name.startswith("."))


def _files(folder: Path, present: list[str], classes: list[str]) -> tuple[list, list]:
    """(paths, labels) of the images in folder/<class>/ (searched recursively, in sorted order)."""
    items, labels = [], []
    for name in present:
        found = sorted(p for p in (folder / name).rglob("*") if p.is_file() and not p.name.startswith(".")
                       and not any(part.startswith(".") for part in p.relative_to(folder).parts))
        for p in found:
            if p.suffix.lower() not in EXTENSIONS:
                raise ConfigError(f"{p} is not an image ({p.suffix or 'no extension'}); move it out of the class "
                                  f"folder (images: {', '.join(EXTENSIONS)})")
        if not found:
            raise ConfigError(f"{folder / name} is a class folder with no images; add images or remove the folder")
        items += [str(p) for p in found]
        labels += [classes.index(name)] * len(found)
    return items, labels


def _header(path: str):
    """(width, height, mode) from the file's header, or the reason it cannot be read."""
    try:
        with Image.open(path) as image:
            return image.size + (image.mode,)
    except Exception as err:   # PIL raises several types for foreign or damaged files
        return f"{type(err).__name__}: {str(err).splitlines()[0][:100]}" if str(err) else type(err).__name__


def _shape(splits: dict, images) -> tuple[tuple, list]:
    """The input shape (C, H, W) from images.channels and size, else from the files' headers, which must agree
    on the channel count (and are checked to be images)."""
    if images.channels and images.size:
        return (images.channels, images.size, images.size), []
    paths = [p for items, _ in splits.values() for p in items]
    with ThreadPoolExecutor(16) as pool:
        headers = list(pool.map(_header, paths, chunksize=256))
    for path, header in zip(paths, headers):
        if isinstance(header, str):
            raise ConfigError(f"{path} cannot be read as an image ({header}); replace or remove it")
    first = headers[0]
    if not images.channels:
        for path, (_, _, mode) in zip(paths, headers):
            if channels_of(mode) != channels_of(first[2]):
                raise ConfigError(f"{path} has {channels_of(mode)} channel(s) (mode {mode}) where {paths[0]} has "
                                  f"{channels_of(first[2])}; convert it, or set dataset.images.channels=3 (or 1) to "
                                  "convert every image")
    channels = images.channels or channels_of(first[2])
    if images.size:
        return (channels, images.size, images.size), []
    train = headers[:len(splits["train"][0])]
    sizes = {(w, h) for w, h, _ in train}
    if len(sizes) == 1:
        (w, h), = sizes
        return (channels, h, w), []
    side = min(min(w, h) for w, h in sizes)
    return (channels, side, side), [f"the training images come in {len(sizes)} sizes; inputs are {side}x{side}, the "
                                    f"smallest side (set dataset.images.size to choose another)"]


def _prepare_imagenet(root: Path) -> None:
    """torchvision's ImageNet preparation: the devkit's meta.bin, and train/ and val/ extracted from their
    archives when not there yet."""
    from torchvision.datasets import imagenet   # a second to import: only file datasets need it

    try:
        if not (root / imagenet.META_FILE).is_file():
            imagenet.parse_devkit_archive(str(root))
        for split, parse in (("train", imagenet.parse_train_archive), ("val", imagenet.parse_val_archive)):
            if not (root / split).is_dir():
                parse(str(root))
    except Exception as err:
        reason = f"{type(err).__name__}: {str(err).strip()}".splitlines()[0][:160]
        raise ConfigError(f"dataset imagenet is missing or unreadable in {root} ({reason}); place torchvision's "
                          "ImageNet files there: ILSVRC2012_devkit_t12.tar.gz with ILSVRC2012_img_train.tar and "
                          "ILSVRC2012_img_val.tar, or the train/, val/ and meta.bin they extract to") from None


def _torchvision(dataset: Dataset, data: Data) -> Listing:
    import torchvision   # a second to import: only file datasets need it

    images = dataset.images
    names = [n for n in dir(torchvision.datasets) if n[0].isupper()]
    if images.cls not in names:
        close = difflib.get_close_matches(images.cls, names)
        raise ConfigError(f"dataset.images.cls={images.cls!r} is not a torchvision.datasets class; closest: "
                          f"{', '.join(close) or 'none'}")
    cls = getattr(torchvision.datasets, images.cls)
    takes = inspect.signature(cls).parameters

    def make(split):
        kwargs = dict(images.kwargs)
        if "train" in takes:
            kwargs.setdefault("train", split == "train")
        elif "split" in takes:
            kwargs.setdefault("split", split)
        if "download" in takes:
            kwargs["download"] = data.download
        return cls(data.root, **kwargs)

    try:
        sets = {split: make(split) for split in ("train", "test")}
    except Exception as err:   # torchvision's readers fail in many ways on missing or damaged files
        reason = f"{type(err).__name__}: {str(err).strip()}".splitlines()[0][:160].rstrip(": ")
        raise ConfigError(f"torchvision dataset {images.cls} is missing or unreadable in {data.root} ({reason}); "
                          "place its files there, or pass data.download=true") from None
    splits = {split: ([(split, i) for i in range(len(ds))], _labels(ds)) for split, ds in sets.items()}
    classes = list(getattr(sets["train"], "classes", None) or range(max(splits["train"][1]) + 1))
    first = DatasetReader(sets).open(("train", 0))
    channels = images.channels or channels_of(first.mode)
    size = images.size
    shape = (channels, size, size) if size else (channels, first.size[1], first.size[0])
    return Listing(classes, splits, shape, reader=DatasetReader(sets))


def _labels(ds) -> list[int]:
    """A torchvision dataset's labels, from its label attribute where it keeps one (else read one by one)."""
    for name in ("targets", "labels", "_labels", "_targets", "y"):
        labels = getattr(ds, name, None)
        if labels is not None and len(labels) == len(ds):
            return [int(v) for v in (labels.tolist() if hasattr(labels, "tolist") else labels)]
    return [int(ds[i][1]) for i in range(len(ds))]
