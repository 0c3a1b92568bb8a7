"""Datasets of image files: image folders, torchvision's ImageNet layout and torchvision datasets by name, the
streaming path (loader workers) beside the resident one, resume, ranks, and bad input."""

import json
import math
import random
import shutil
import signal
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision
from PIL import Image

from fitnets_cli.data.images import resolve
from fitnets_cli.data.load import load_data
from fitnets_cli.data.splits import Resident, held_out
from fitnets_cli.data.streaming import Streamed, crop_box
from helpers import (failure, in_stage, main, make_config, signal_when, start, without_timing, write_image_folder,
                     write_tiny_mnist)
from test_scale import TORCHRUN, numbers

STUDENT = ["student=module", "student._target_=helpers.TinyNet"]
# Short runs: 1-2 epochs of batches of 4 from 24 training images (8 per class), on CPU, with 2 loader workers.
SHORT = ["recipe.student.max_epochs=2", "recipe.student.batch_size=4", "recipe.student.lr=0.05", "device=cpu",
         "data.workers=2", "eval_batch_size=8"]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """(data root, teacher weights): a tiny image folder (PNG 12x12 and JPEG 16x16, 3 classes, train/ and val/)
    and a torchvision ResNet-18's state_dict for 3 classes, as a torchvision checkpoint file is stored."""
    root = tmp_path_factory.mktemp("images")
    data = write_image_folder(root / "data")
    torch.manual_seed(0)
    weights = root / "resnet18.pth"
    torch.save(torchvision.models.resnet18(num_classes=3).state_dict(), weights)
    return data, weights


def teacher(folder):
    return ["teacher=torchvision", "teacher.arch=resnet18", f"teacher.weights={folder[1]}"]


def metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


@pytest.mark.slow
def test_an_image_folder_trains_end_to_end_streamed_with_a_torchvision_teacher(folder, tmp_path):
    run = tmp_path / "run"
    out = main("train", "dataset=imagefolder", f"data.root={folder[0]}", *teacher(folder), "student=zoo", "student.arch=resnet8x4",
               *SHORT, "schedule=fitnets", f"hydra.run.dir={run}")
    assert "decoding" not in out and "teacher outputs computed once" not in out   # streamed; the teacher ran live
    assert "the training images come in 2 sizes; inputs are 12x12" in out
    m = metrics(run)
    assert [s["name"] for s in m["stages"]] == ["hint:layer2<-layer2", "kd"]   # the zoo student's feat[2]
    assert [s["epochs"] for s in m["stages"]] == [2, 2] and m["dataset"] == "imagefolder"
    history = m["stages"][1]["history"]
    assert all(h["images_s"] > 0 and 0 <= h["data_wait"] < 1 for h in history)
    assert all(math.isfinite(h["train_ce"]) for h in history)
    assert f"test accuracy {m['test']['acc']:.2%}" in out and m["model"] == "resnet8x4"
    # the shape and the classes came from the files, and the checkpoint records them
    saved = torch.load(run / "checkpoints" / "student.pt", weights_only=True)
    assert (saved["in_shape"], saved["num_classes"]) == ([3, 12, 12], 3)


def test_resident_and_streamed_splits_give_the_same_batches_for_the_same_seed(folder):
    cfg = resolve(make_config("train", ["dataset=imagefolder", f"data.root={folder[0]}", "device=cpu",
                                        "data.workers=2", "dataset.augment.resized_crop=false"]))
    held = load_data(cfg.dataset, cfg.data, torch.device("cpu"))
    streamed = load_data(cfg.dataset, replace(cfg.data, resident="false"), "cpu")
    assert isinstance(held.train, Resident) and isinstance(streamed.train, Streamed)
    order = torch.randperm(24, generator=torch.Generator().manual_seed(0))
    for a, b in zip(held.train.batches(5, order, 1, None, train=True), streamed.train.batches(5, order, 1, None, train=True)):
        assert all(torch.equal(u, v) for u, v in zip(a[:3], b[:3])) and a[3] == b[3]
    assert held.train.x.shape == (24, 3, 12, 12) and len(held.valid) == len(held.test) == 12   # val/: both


def test_a_folder_without_val_holds_out_and_streams_alike_for_any_worker_count(tmp_path):
    # The layout of the image-folder bench (train/ and test/, no val/: validation held out of train/): the held-out
    # images and every streamed batch must not depend on the loader's worker count, so that a run's figures
    # move only with its seed and the machine's arithmetic.
    root = write_image_folder(tmp_path / "data", per_class=(10, 4))
    (root / "val").rename(root / "test")
    splits = {}
    for workers in (0, 2):
        cfg = resolve(make_config("train", ["dataset=imagefolder", f"data.root={root}", "device=cpu", "data.resident=false",
                                            f"data.workers={workers}", "dataset.augment.resized_crop=false"]))
        splits[workers] = load_data(cfg.dataset, cfg.data, torch.device("cpu"))
    a, b = splits[0], splits[2]
    assert a.train.files.items == b.train.files.items and a.valid.files.items == b.valid.files.items
    assert len(a.valid) == 3 and sorted(a.valid.files.labels) == [0, 1, 2]   # 0.1 of each class of 10
    order = torch.randperm(len(a.train), generator=torch.Generator().manual_seed(0))
    for u, v in zip(a.train.batches(4, order, train=True), b.train.batches(4, order, train=True)):
        assert torch.equal(u[0], v[0]) and torch.equal(u[1], v[1])
    for u, v in zip(a.test.batches(5), b.test.batches(5)):
        assert torch.equal(u[0], v[0])


@pytest.mark.slow
def test_resident_and_streamed_runs_train_alike(folder, tmp_path):
    runs = {}
    for resident in ("true", "false"):
        runs[resident] = tmp_path / resident
        main("train", "dataset=imagefolder", f"data.root={folder[0]}", *STUDENT, *SHORT, "schedule=backprop",
             "dataset.augment.resized_crop=false", f"data.resident={resident}", f"hydra.run.dir={runs[resident]}")
    # Flips drawn on the device from the same seed, the same decoded images: the same training.
    assert numbers(runs["true"]) == numbers(runs["false"])


@pytest.mark.slow
def test_imagenet_layout_is_read_as_torchvision_prepares_it(tmp_path):
    """The folders and meta.bin that torchvision extracts from ImageNet's archives: two classes by WordNet id."""
    root = tmp_path / "imagenet"
    wnids = ["n01440764", "n01443537"]
    for split in ("train", "val"):
        for c, wnid in enumerate(wnids):
            (root / split / wnid).mkdir(parents=True)
            for i in range(2):
                Image.fromarray(np.full((20, 24, 3), 60 + 100 * c, np.uint8)).save(root / split / wnid / f"{i}.JPEG")
    torch.save(({w: (f"class {w}",) for w in wnids}, [wnids[0]] * 2 + [wnids[1]] * 2), root / "meta.bin")
    cfg = resolve(make_config("train", ["dataset=imagenet", f"data.root={root}", "data.workers=1",
                                        "dataset.images.size=16", "dataset.images.resize=18"]))
    assert (cfg.dataset.in_shape, cfg.dataset.num_classes) == ([3, 16, 16], 2)
    data = load_data(cfg.dataset, cfg.data, "cpu")
    assert isinstance(data.train, Streamed) and data.valid is data.test and len(data.test) == 4   # val/ scores
    [(x, y, _, _)] = data.test.batches(8)
    # resized to 18 on the shorter side, centre-cropped to 16, normalised with ImageNet's mean and std
    assert x.shape == (4, 3, 16, 16) and y.tolist() == [0, 0, 1, 1]
    expected = (torch.tensor([60 / 255, 160 / 255]) - 0.485) / 0.229
    assert torch.allclose(x[:, 0].mean((1, 2)), expected.repeat_interleave(2), atol=0.02)


@pytest.mark.slow
def test_a_torchvision_dataset_by_name_reads_the_same_images_as_the_built_in_loader(tmp_path):
    root = write_tiny_mnist(tmp_path)
    by_name = resolve(make_config("train", ["dataset=torchvision", "dataset.images.cls=MNIST", f"data.root={root}",
                                            "dataset.valid_size=50", "data.workers=1"]))
    assert (by_name.dataset.name, by_name.dataset.in_shape, by_name.dataset.num_classes) == ("MNIST", [1, 28, 28], 10)
    files = load_data(by_name.dataset, by_name.data, "cpu")
    built_in = make_config("train", ["dataset=mnist", f"data.root={root}", "dataset.valid_size=50"]).dataset
    tensors = load_data(built_in, by_name.data, "cpu")
    assert isinstance(files.test, Resident) and torch.equal(files.test.x, tensors.test.x)
    assert torch.equal(files.test.y, tensors.test.y) and len(files.train) == 150 and len(files.valid) == 50


def test_a_misspelt_torchvision_dataset_names_the_closest(tmp_path):
    assert "closest: FashionMNIST" in failure("train", "dataset=torchvision", "dataset.images.cls=FashionMnist",
                                              f"hydra.run.dir={tmp_path / 'run'}")


# ---------------------------------------------------------------- resume and ranks (subprocesses)

RESUMABLE = ["dataset=imagefolder", *STUDENT, "schedule=kd", "recipe.student.max_epochs=3",
             "recipe.student.batch_size=2", "recipe.student.optimizer=sgd", "recipe.student.lr=0.02",
             "deterministic=true", "device=cpu", "data.workers=2", "eval_batch_size=8"]


@pytest.fixture
def importable(monkeypatch):
    """`helpers.TinyNet` importable in `fitnets` subprocesses, as a user's own module on PYTHONPATH."""
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))


@pytest.mark.slow
def test_a_streamed_run_stopped_mid_epoch_resumes_on_the_same_images(folder, tmp_path, importable):
    # Random-resized crops on the workers and flips on the device: a resumed run must see the same views.
    args = [*RESUMABLE, f"data.root={folder[0]}", *teacher(folder), "dataset.augment.resized_crop=true",
            "dataset.augment.flip=true"]
    reference = tmp_path / "reference"
    main("train", *args, f"hydra.run.dir={reference}")
    run = tmp_path / "run"
    proc = start("train", *args, f"hydra.run.dir={run}")
    signal_when(proc, run / "checkpoints" / "last.pt", lambda s: in_stage(s) and in_stage(s)["epoch"] >= 1, signal.SIGTERM)
    _, err = proc.communicate(timeout=300)
    assert proc.returncode == 128 + signal.SIGTERM, err
    state = torch.load(run / "checkpoints" / "last.pt", weights_only=True)
    assert in_stage(state)["batch"] > 0 and in_stage(state)["seed"] != 0   # inside an epoch, crops seeded
    main("train", f"resume={run}")
    history = lambda m: without_timing([h for s in m["stages"] for h in s["history"]])
    assert history(metrics(reference)) == history(metrics(run)) and metrics(reference)["test"] == metrics(run)["test"]
    weights = lambda r: torch.load(r / "checkpoints" / "student.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(v, weights(run)[k]) for k, v in weights(reference).items())


@pytest.mark.slow
def test_two_ranks_stream_their_shares_and_train_like_one_process(folder, tmp_path, importable):
    # Crops are drawn per image from the epoch's seed, so both runs cut the same ones; flips are off (they are
    # drawn on each rank's device).
    args = [*RESUMABLE, f"data.root={folder[0]}", *teacher(folder), "dataset.augment.resized_crop=true",
            "dataset.augment.flip=false", "recipe.student.batch_size=4", "recipe.student.max_epochs=2"]
    single = tmp_path / "single"
    main("train", *args, f"hydra.run.dir={single}")
    proc = start("train", *args, f"hydra.run.dir={tmp_path / 'ddp'}", command=TORCHRUN)
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, out + err
    one, two = numbers(single), numbers(tmp_path / "ddp")
    assert len(one) == len(two) == 2 * 6 + 2   # 2 epochs of train ce, kd, acc, valid loss, acc, error; test
    assert all(math.isclose(a, b, rel_tol=1e-4, abs_tol=1e-6) for a, b in zip(one, two)), list(zip(one, two))


# ---------------------------------------------------------------- bad input

def broken(tmp_path, damage) -> Path:
    """A fresh copy of the tiny folder, damaged by damage(root)."""
    root = write_image_folder(tmp_path / "data")
    damage(root)
    return root


def grey(root):
    Image.fromarray(np.zeros((12, 12), np.uint8)).save(root / "train" / "class1" / "grey.png")


def emptied(folder):
    shutil.rmtree(folder)
    folder.mkdir()


CASES = {   # damage, the file or folder the error names, what it says
    "empty folder": (emptied, "{r}", "has no train/ folder"),
    "no class folders": (lambda r: emptied(r / "train"), "{r}/train", "holds no class folders"),
    "empty val folder": (lambda r: emptied(r / "val"), "{r}/val", "holds no class folders"),
    "empty class folder": (lambda r: (r / "train" / "class3").mkdir(), "{r}/train/class3",
                           "is a class folder with no images"),
    "not an image": (lambda r: (r / "train" / "class0" / "notes.txt").write_text("x"),
                     "{r}/train/class0/notes.txt", "is not an image (.txt)"),
    "unreadable image": (lambda r: (r / "val" / "class2" / "9.png").write_bytes(b"not a png at all"),
                         "{r}/val/class2/9.png", "cannot be read as an image"),
    "val class not in train": (lambda r: (r / "val" / "class2").rename(r / "val" / "dogs"), "{r}/val/dogs",
                               "has no folder in"),
    "channel count": (grey, "{r}/train/class1/grey.png", "has 1 channel(s) (mode L) where"),
}


@pytest.mark.parametrize("case", CASES)
def test_bad_image_folders_stop_in_one_line_before_anything_is_written(tmp_path, case):
    damage, names, says = CASES[case]
    root = broken(tmp_path, damage)
    line = failure("train", "dataset=imagefolder", f"data.root={root}", *STUDENT,
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert names.format(r=root) in line and says in line, line
    assert not (tmp_path / "run").exists()


def without_val(root: Path, drop: int = 0) -> Path:
    """The folder less its val/ (validation is then held out of train/) and less `drop` images of class0."""
    shutil.rmtree(root / "val")
    for path in sorted((root / "train" / "class0").iterdir())[:drop]:
        path.unlink()
    return root


@pytest.mark.parametrize("classes, per_class, drop, args, says", [
    (3, 2, 0, [], "dataset.valid_size=0.1 holds out no image of the 6 in train/ (classes of 2 to 2 images)"),
    (3, 2, 1, ["dataset.valid_size=3"], "would hold out 1 of the 1 image(s) of class 'class0', leaving none"),
    (1, 8, 0, [], "holds one class (class0); a classifier needs two or more class folders"),
])
def test_a_folder_too_small_for_its_validation_share_stops_in_one_line(tmp_path, classes, per_class, drop, args, says):
    root = without_val(write_image_folder(tmp_path / "data", classes, (per_class, 1)), drop)
    line = failure("train", "dataset=imagefolder", f"data.root={root}", *STUDENT, *args,
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert says in line, line
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_a_truncated_image_stops_the_run_naming_it_or_is_skipped_and_counted(tmp_path):
    def truncate(root):
        path = root / "train" / "class0" / "1.jpg"
        path.write_bytes(path.read_bytes()[:-40])   # the header intact, the scan cut short

    root = broken(tmp_path, truncate)
    args = ["train", "dataset=imagefolder", f"data.root={root}", *STUDENT, *SHORT, "schedule=backprop",
            "recipe.student.max_epochs=1"]
    line = failure(*args, f"hydra.run.dir={tmp_path / 'stop'}")
    assert f"{root}/train/class0/1.jpg cannot be decoded (" in line and "data.bad_images=skip" in line
    out = main(*args, "data.bad_images=skip", f"hydra.run.dir={tmp_path / 'skip'}")
    assert f"1 image(s) failed to decode and were left out (data.bad_images=skip): {root}/train/class0/1.jpg" in out
    assert metrics(tmp_path / "skip")["skipped_images"] == [f"{root}/train/class0/1.jpg"]


def test_resident_true_with_resized_crops_is_refused(folder, tmp_path):
    line = failure("train", "dataset=imagefolder", f"data.root={folder[0]}", *STUDENT, *SHORT, "schedule=backprop",
                   "data.resident=true", f"hydra.run.dir={tmp_path / 'run'}")
    assert "data.resident=true holds decoded images" in line


def test_a_fraction_holds_out_the_same_share_of_every_class():
    labels = torch.tensor([0] * 30 + [1] * 10)[torch.randperm(40, generator=torch.Generator().manual_seed(0))]
    keep, held = held_out(labels, 0.1, ["a", "b"], seed=0)
    assert torch.bincount(labels[held]).tolist() == [3, 1] and len(keep) == 36
    classes = ["a", "b"]
    assert torch.equal(held, held_out(labels, 0.1, classes, 0)[1]) and not torch.equal(held, held_out(labels, 0.1, classes, 1)[1])


def test_random_resized_crops_are_drawn_like_torchvisions_from_the_seed_alone():
    boxes = [crop_box(random.Random(seed), 40, 30, (0.08, 1.0), (3 / 4, 4 / 3)) for seed in range(2000)]
    assert all(0 <= x and 0 <= y and x + w <= 40 and y + h <= 30 for x, y, w, h in boxes)
    areas = [w * h / 1200 for _, _, w, h in boxes]
    assert min(areas) < 0.12 and max(areas) > 0.9 and len(set(boxes)) > 1000
    assert crop_box(random.Random(7), 40, 30, (0.08, 1.0), (3 / 4, 4 / 3)) == boxes[7]
    # a range no crop can meet falls back to the centre, its aspect clamped, as torchvision's does
    assert crop_box(random.Random(0), 100, 10, (0.99, 1.0), (1.0, 1.0)) == (45, 0, 10, 10)
