import json
from dataclasses import asdict

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision

from fitnets_cli.config.errors import ConfigError
from fitnets_cli.config.groups import Data, Network
from fitnets_cli.data.load import load_data
from fitnets_cli.data.preprocess import gcn, lecun_lcn, zca_apply, zca_fit
from fitnets_cli.data.splits import Resident, stratified_split
from fitnets_cli.data.views import augment
from fitnets_cli.networks.build import build_network
from fitnets_cli.networks.checkpoint import saved_dataset
from fitnets_cli.training.stages import Session, Stage, teacher_cache
from fitnets_cli.training.terms import Term
from helpers import call, failure, main, write_cifar, write_svhn, write_tiny_mnist


def dataset_cfg(make_config, name, **overrides):
    cfg = make_config("train", [f"dataset={name}"] + [f"dataset.{k}={v}" for k, v in overrides.items()])
    return cfg.dataset


def test_mnist_loads_from_official_idx_files(make_config, tiny_mnist):
    splits = load_data(dataset_cfg(make_config, "mnist", valid_size=50), Data(root=str(tiny_mnist)), "cpu")
    x = splits.train.x
    assert x.shape == (150, 1, 28, 28) and x.dtype == torch.float32
    assert len(splits.valid.x) == 50 and torch.bincount(splits.valid.y).tolist() == [5] * 10
    # The test split keeps the file's order: its images are the file's bytes scaled to [0, 1].
    raw = tiny_mnist / "MNIST" / "raw"
    images = np.frombuffer((raw / "t10k-images-idx3-ubyte").read_bytes()[16:], np.uint8).reshape(50, 1, 28, 28)
    labels = np.frombuffer((raw / "t10k-labels-idx1-ubyte").read_bytes()[8:], np.uint8)
    assert torch.equal(splits.test.x, torch.from_numpy(images.copy()).float() / 255)
    assert torch.equal(splits.test.y, torch.from_numpy(labels.astype(np.int64)))


def test_the_shipped_mnist_subset_loads_without_files(make_config, tmp_path):
    splits = load_data(dataset_cfg(make_config, "mnist_subset"), Data(root=str(tmp_path)), "cpu")
    assert [len(s) for s in (splits.train, splits.valid, splits.test)] == [4000, 1000, 1000]
    assert torch.bincount(splits.test.y).tolist() == [100] * 10


def test_missing_dataset_names_the_fix(make_config, tmp_path):
    with pytest.raises(ConfigError, match="data.download=true"):
        load_data(dataset_cfg(make_config, "mnist"), Data(root=str(tmp_path / "nowhere")), "cpu")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["cifar10", "cifar100"])
def test_cifar_loads_from_official_pickles_with_gcn_zca_cached(make_config, tiny_datasets, monkeypatch, name):
    # The tiny files cannot match torchvision's MD5 sums; everything else is torchvision's real reader.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    root = tiny_datasets[name]      # 20 training images, labels cycling through the classes; 10 test images
    ds = dataset_cfg(make_config, name, valid_size=10)
    splits = load_data(ds, Data(root=str(root)), "cpu")
    assert splits.train.x.shape == (10, 3, 32, 32) and splits.test.x.shape == (10, 3, 32, 32)
    assert sorted(splits.valid.y.tolist()) == list(range(10)) and splits.test.y.tolist() == list(range(10))
    # Whitened with the training images' statistics: features have zero mean over them (valid included).
    images = torch.cat([splits.train.x, splits.valid.x]).flatten(1)
    assert images.mean(0).abs().max() < 1e-4
    assert len(list((root / "fitnets_cache").glob(f"{name}-gcn_zca-*.pt"))) == 1
    monkeypatch.setattr("fitnets_cli.data.preprocess.zca_fit", None)      # a second load must not whiten again
    again = load_data(ds, Data(root=str(root)), "cpu")
    assert torch.equal(again.train.x, splits.train.x)


def test_svhn_loads_from_official_mat_files_with_the_extra_split(make_config, tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets.svhn, "check_integrity", lambda *args: True)
    write_svhn(tmp_path, np.random.default_rng(0))
    splits = load_data(dataset_cfg(make_config, "svhn", valid_size=30), Data(root=str(tmp_path)), "cpu")
    # valid: 2 per class from train + 1 per class from extra; train: the rest of train + extra.
    assert len(splits.valid.x) == 30 and len(splits.train.x) == 40 + 30 - 30
    assert torch.bincount(splits.valid.y).tolist() == [3] * 10
    assert set(splits.test.y.tolist()) == set(range(10))
    assert torch.isfinite(splits.train.x).all()


@pytest.mark.slow
@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100", "svhn"])
def test_garbled_dataset_files_stop_in_one_line_naming_the_folder(name, tmp_path):
    rng = np.random.default_rng(0)
    if name == "mnist":
        folder = write_tiny_mnist(tmp_path) / "MNIST" / "raw"
        garbled = folder / "train-images-idx3-ubyte"
    elif name == "svhn":
        write_svhn(tmp_path, rng)
        folder, garbled = tmp_path, tmp_path / "train_32x32.mat"
    else:
        folder = write_cifar(tmp_path, name, 20, 10, rng)
        garbled = folder / ("data_batch_1" if name == "cifar10" else "train")
    # The right name and size, random bytes: what a damaged copy or download leaves.
    garbled.write_bytes(rng.bytes(garbled.stat().st_size))
    line = failure("train-teacher", f"dataset={name}", f"data.root={tmp_path}", "device=cpu",
                   f"hydra.run.dir={tmp_path / 'run'}", md5=False)
    assert f"dataset {name} is missing or unreadable in {folder} (" in line, line
    assert line.endswith("or delete them and pass data.download=true")
    assert not (tmp_path / "run" / "checkpoints").exists()     # it stopped before training


def test_stratified_split_is_seeded_disjoint_and_balanced():
    labels = torch.arange(10).repeat(30)
    keep, held = stratified_split(labels, 50, 10, seed=3)
    assert torch.bincount(labels[held]).tolist() == [5] * 10
    assert len(set(keep.tolist()) | set(held.tolist())) == 300 and not set(keep.tolist()) & set(held.tolist())
    assert torch.equal(held, stratified_split(labels, 50, 10, seed=3)[1])
    assert not torch.equal(held, stratified_split(labels, 50, 10, seed=4)[1])
    with pytest.raises(ConfigError, match="lower dataset.valid_size"):
        stratified_split(labels, 400, 10, seed=0)


def test_gcn_and_zca():
    x = torch.rand(6, 3, 4, 4) * 255
    g = gcn(x, 55.0).flatten(1)
    assert torch.allclose(g.mean(1), torch.zeros(6), atol=1e-4)
    assert torch.allclose(g.norm(dim=1), torch.full((6,), 55.0), rtol=1e-5)
    data = torch.randn(4000, 5) @ torch.randn(5, 5)
    mean, whiten = zca_fit(data, bias=0.0)
    white = zca_apply(data, mean, whiten)
    assert torch.allclose(white.T @ white / len(white), torch.eye(5), atol=1e-3)
    assert torch.allclose(whiten, whiten.T, atol=1e-5)      # ZCA, not PCA: the whitening is symmetric


def test_lcn_centres_flat_images():
    out = lecun_lcn(torch.full((2, 3, 32, 32), 0.7))
    assert out.shape == (2, 3, 32, 32) and out[:, :, 8:24, 8:24].abs().max() < 1e-5


@pytest.mark.slow
def test_augment_draws_uniform_crops_and_fair_flips_and_keeps_order():
    n, h, w, pad = 20000, 16, 16, 4
    rows = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w) + 1
    cols = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w) + 1
    ident = torch.arange(n, dtype=torch.float32)[:, None, None].expand(n, h, w)
    x = torch.stack([rows.expand(n, h, w), cols.expand(n, h, w), ident], 1)
    torch.manual_seed(0)
    out = augment(x, pad, flip=True)
    c = h // 2
    assert torch.equal(out[:, 2, c, c], torch.arange(n, dtype=torch.float32))   # image i stays at i
    dy = out[:, 0, c, c] - 1 - c + pad
    flipped = out[:, 1, c, c + 1] < out[:, 1, c, c]
    dx = torch.where(flipped, out[:, 1, c, c] - 1 - (w - 1 - c) + pad, out[:, 1, c, c] - 1 - c + pad)
    for offsets in (dy, dx):
        counts = torch.bincount(offsets.long(), minlength=2 * pad + 1)
        assert len(counts) == 2 * pad + 1 and counts.min() > 0
        assert (counts.float() / n - 1 / (2 * pad + 1)).abs().max() < 0.015
    assert abs(flipped.float().mean().item() - 0.5) < 0.015
    assert torch.equal(augment(x[:3], 0, False), x[:3])


# A ConvNeXt small enough for seconds on a CPU: its stem (stride 4) and three stride-2 downsamplings need 32
# px; on 28x28 MNIST the last one meets a 1x1 map and fails.
CONVNEXT = ["teacher=timm", "teacher.arch=convnext_atto", "+teacher.depths=[1,1,1,1]", "+teacher.dims=[8,16,16,16]"]


def test_resize_serves_mnist_batches_resized_on_the_device_without_a_resized_copy(make_config, tiny_mnist):
    ds = dataset_cfg(make_config, "mnist", valid_size=50, resize=32)
    assert ds.in_shape == [1, 32, 32] and ds.resize == 32
    assert saved_dataset({"dataset": asdict(ds)}).in_shape == [1, 32, 32]   # re-read (resume, eval): the same
    splits = load_data(ds, Data(root=str(tiny_mnist)), "cpu")
    native = load_data(dataset_cfg(make_config, "mnist", valid_size=50), Data(root=str(tiny_mnist)), "cpu")
    for split, plain in zip((splits.train, splits.valid, splits.test), (native.train, native.valid, native.test)):
        assert split.side == 32 and split.x.shape[1:] == (1, 28, 28)   # held at its own size
        assert torch.equal(split.x, plain.x)
        x, y, idx, _ = next(split.batches(16, order=torch.arange(len(split)).flip(0)))
        expected = F.interpolate(plain.x[idx], size=(32, 32), mode="bilinear", align_corners=False)
        assert x.shape == (16, 1, 32, 32) and torch.allclose(x, expected, atol=1e-6)
        assert torch.equal(y, plain.y[idx]) and not torch.equal(x[:, :, :28, :28], plain.x[idx])
    both = splits.train + splits.valid
    assert both.side == 32 and both.rows(torch.tensor([0])).shape == (1, 1, 32, 32)
    # Shrinking is antialiased, as PIL and torchvision's Resize shrink (plain bilinear would skip pixels).
    small = Resident(torch.rand(2, 3, 28, 28, generator=torch.Generator().manual_seed(0)), torch.zeros(2), side=8)
    shrunk = small.rows(torch.arange(2))
    resized = lambda antialias: F.interpolate(small.x, size=(8, 8), mode="bilinear", antialias=antialias)
    assert torch.allclose(shrunk, resized(True), atol=1e-6) and not torch.allclose(shrunk, resized(False), atol=1e-3)
    # Without a side, rows are the tensor's own rows (positional x, y as before).
    assert torch.equal(Resident(plain.x, plain.y).rows(idx), plain.x[idx])


def test_resize_of_image_files_or_not_positive_stops_in_one_line(tmp_path):
    line = failure("train-teacher", "dataset=imagefolder", f"data.root={tmp_path}", "dataset.resize=32",
                   "device=cpu", f"hydra.run.dir={tmp_path / 'run'}")
    assert "dataset.resize applies to mnist, cifar and svhn tensors" in line and "dataset.images.size" in line, line
    line = failure("train-teacher", "dataset=mnist_subset", "dataset.resize=0", "device=cpu",
                   f"hydra.run.dir={tmp_path / 'run'}")
    assert "dataset.resize must be > 0" in line, line
    assert not (tmp_path / "run" / "checkpoints").exists()


def test_the_teacher_cache_of_a_resized_split_equals_live_passes_on_resized_batches(make_config):
    cfg = make_config("train", ["dataset=mnist_subset", "dataset.resize=32", "eval_batch_size=7"])
    torch.manual_seed(0)
    teacher = build_network(Network(source="timm", arch="convnext_atto",
                                    kwargs={"depths": [1, 1, 1, 1], "dims": [8, 16, 16, 16]}),
                            cfg.dataset.in_shape, 10).eval()
    g = torch.Generator().manual_seed(0)
    split = Resident(torch.rand(20, 1, 28, 28, generator=g), torch.randint(0, 10, (20,), generator=g), side=32)
    reading = lambda layer: Stage("s", [Term("t", (1.0, 1.0, 0, 0), False, [None], [layer], None)])
    for stage, layer in ((reading(None), None), (reading("stages.1"), "stages.1")):
        cache = teacher_cache(cfg, Session(teacher, teacher), stage, split, augmented=False)
        for idx in (torch.arange(5), torch.tensor([19, 3, 11])):   # across the cache's batches of 7
            resized = F.interpolate(split.x[idx], size=(32, 32), mode="bilinear", align_corners=False)
            with torch.no_grad():
                live = teacher.taps(resized, [layer])[layer]
            assert torch.allclose(cache[layer][idx], live, atol=1e-5)


@pytest.mark.slow
def test_a_convnext_teacher_trains_on_mnist_resized_to_32_and_eval_reads_the_resize_back(tiny, tiny_mnist, tmp_path):
    line = failure("train-teacher", *tiny, *CONVNEXT, "recipe.teacher.max_epochs=1", f"hydra.run.dir={tmp_path / 'no'}")
    assert "network convnext_atto does not run on (1, 28, 28) images" in line and "dataset.resize=N for mnist" in line
    assert "dataset.images.size=N for image files" in line, line
    run = tmp_path / "r"
    main("train-teacher", *tiny, *CONVNEXT, "dataset.resize=32", "recipe.teacher.max_epochs=1", f"hydra.run.dir={run}")
    metrics = json.loads((run / "metrics.json").read_text())
    checkpoint = torch.load(run / "checkpoints" / "teacher.pt", weights_only=True)
    assert checkpoint["in_shape"] == [1, 32, 32] and checkpoint["dataset"]["resize"] == 32
    evaluated = call("eval", f"checkpoint={run / 'checkpoints' / 'teacher.pt'}", "device=cpu",
                     f"data.root={tiny_mnist}").stdout
    assert f"{metrics['test']['acc']:.2%}" in evaluated
