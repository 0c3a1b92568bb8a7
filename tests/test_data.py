import pickle

import numpy as np
import pytest
import scipy.io
import torch
import torchvision

from fitnets_cli.config import ConfigError, Data
from fitnets_cli.data import augment, gcn, lecun_lcn, load_data, stratified_split, zca_apply, zca_fit


def dataset_cfg(make_config, name, **overrides):
    cfg = make_config("train", [f"dataset={name}"] + [f"dataset.{k}={v}" for k, v in overrides.items()])
    return cfg.dataset


def test_mnist_loads_from_official_idx_files(make_config, tiny_mnist):
    splits = load_data(dataset_cfg(make_config, "mnist", valid_size=50), Data(root=str(tiny_mnist)), "cpu")
    x, y = splits.train
    assert x.shape == (150, 1, 28, 28) and x.dtype == torch.float32
    assert 0 <= x.min() and x.max() == 1.0
    assert len(splits.valid[0]) == 50 and torch.bincount(splits.valid[1]).tolist() == [5] * 10
    assert splits.test[0].shape == (50, 1, 28, 28)


def test_the_shipped_mnist_subset_loads_without_files(make_config, tmp_path):
    splits = load_data(dataset_cfg(make_config, "mnist_subset"), Data(root=str(tmp_path)), "cpu")
    assert [len(s[0]) for s in (splits.train, splits.valid, splits.test)] == [4000, 1000, 1000]
    assert torch.bincount(splits.test[1]).tolist() == [100] * 10


def test_missing_dataset_names_the_fix(make_config, tmp_path):
    with pytest.raises(ConfigError, match="data.download=true"):
        load_data(dataset_cfg(make_config, "mnist"), Data(root=str(tmp_path / "nowhere")), "cpu")


def write_cifar(root, name, per_class_train, per_class_test, classes, rng):
    folder, label_key = ("cifar-10-batches-py", "labels") if name == "cifar10" else ("cifar-100-python", "fine_labels")
    d = root / folder
    d.mkdir(parents=True)

    def batch(per_class):
        labels = np.repeat(np.arange(classes), per_class)
        return {"data": rng.integers(0, 256, (len(labels), 3072), dtype=np.uint8), label_key: labels.tolist()}

    if name == "cifar10":
        files = {f"data_batch_{i}": batch(per_class_train // 5) for i in range(1, 6)}
        files.update(test_batch=batch(per_class_test), **{"batches.meta": {"label_names": [str(i) for i in range(10)]}})
    else:
        files = {"train": batch(per_class_train), "test": batch(per_class_test),
                 "meta": {"fine_label_names": [str(i) for i in range(classes)]}}
    for fname, obj in files.items():
        with open(d / fname, "wb") as f:
            pickle.dump(obj, f)


@pytest.mark.parametrize("name,classes", [("cifar10", 10), ("cifar100", 100)])
def test_cifar_loads_from_official_pickles_with_gcn_zca_cached(make_config, tmp_path, monkeypatch, name, classes):
    # The tiny files cannot match torchvision's MD5 sums; everything else is torchvision's real reader.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args: True)
    write_cifar(tmp_path, name, 5, 1, classes, np.random.default_rng(0))
    ds = dataset_cfg(make_config, name, valid_size=classes)
    splits = load_data(ds, Data(root=str(tmp_path)), "cpu")
    assert splits.train[0].shape == (4 * classes, 3, 32, 32) and len(splits.valid[0]) == classes
    assert splits.test[0].shape == (classes, 3, 32, 32)
    assert sorted(splits.valid[1].tolist()) == list(range(classes))
    cache = list((tmp_path / "fitnets_cache").glob(f"{name}-gcn_zca-*.pt"))
    assert len(cache) == 1
    again = load_data(ds, Data(root=str(tmp_path)), "cpu")
    assert torch.equal(again.train[0], splits.train[0])


def test_svhn_loads_from_official_mat_files_with_the_extra_split(make_config, tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets.svhn, "check_integrity", lambda *args: True)
    rng = np.random.default_rng(0)
    for split, per_class in (("train", 4), ("test", 2), ("extra", 3)):
        labels = np.repeat(np.arange(1, 11), per_class)       # SVHN stores digit 0 as label 10
        scipy.io.savemat(tmp_path / f"{split}_32x32.mat",
                         {"X": rng.integers(0, 256, (32, 32, 3, len(labels)), dtype=np.uint8), "y": labels[:, None]})
    splits = load_data(dataset_cfg(make_config, "svhn", valid_size=30), Data(root=str(tmp_path)), "cpu")
    # valid: 2 per class from train + 1 per class from extra; train: the rest of train + extra.
    assert len(splits.valid[0]) == 30 and len(splits.train[0]) == 40 + 30 - 30
    assert torch.bincount(splits.valid[1]).tolist() == [3] * 10
    assert set(splits.test[1].tolist()) == set(range(10))
    assert torch.isfinite(splits.train[0]).all()


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
