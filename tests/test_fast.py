"""The fast data path and step: teacher caching, batched augmentation, and the benchmark's baseline."""

import sys
from pathlib import Path

import pytest
import torch
import torchvision.transforms as T

from fitnets_cli.data.views import augment
from fitnets_cli.training.loop import augmentation
from fitnets_cli.training.stages import autocast, backprop_stage, batch_targets, stage_loss, teacher_cache, weights_at

from helpers import mnist_session, random_split

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import bench  # noqa: E402


def test_cached_teacher_outputs_equal_live_ones(make_config, tmp_path):
    run, s, stages = mnist_session(make_config, tmp_path)
    data = random_split(300, 0)
    x = data.x
    for stage in stages:
        cache = teacher_cache(run.cfg, s, stage, data, False)
        assert cache is not None
        idx = torch.tensor([5, 17, 299, 0])
        live = batch_targets(s, stage, x[idx], None, idx)
        cached = batch_targets(s, stage, x[idx], cache, idx)
        assert live.keys() == cached.keys() and len(live) == 1
        for k in live:
            torch.testing.assert_close(cached[k], live[k], rtol=1e-5, atol=1e-6)


def test_cached_teacher_outputs_equal_live_ones_under_bf16(make_config, tmp_path):
    # The cache is filled under the same autocast as live teacher passes: results must not depend on whether
    # the teacher's outputs fit in memory.
    run, s, stages = mnist_session(make_config, tmp_path, ["amp=true"])
    data = random_split(64, 0)
    x = data.x
    idx = torch.tensor([5, 17, 63, 0])
    for stage in stages:
        cache = teacher_cache(run.cfg, s, stage, data, False)
        with autocast(run.cfg, run.device):
            live = batch_targets(s, stage, x[idx], None, idx)
        for k, cached in batch_targets(s, stage, x[idx], cache, idx).items():
            assert cached.dtype == live[k].dtype == torch.bfloat16
            torch.testing.assert_close(cached, live[k])


def test_caching_switches_off_with_augmentation_or_when_asked(make_config, tmp_path):
    run, s, stages = mnist_session(make_config, tmp_path, ["dataset.augment.flip=true"])
    kd = stages[1]
    data = random_split(32, 0)
    assert teacher_cache(run.cfg, s, kd, data, augmentation(run).random) is None   # each step's view differs: never
    assert teacher_cache(run.cfg, s, kd, data, False) is not None   # validation images are never augmented
    run, s, stages = mnist_session(make_config, tmp_path, ["teacher_cache=false"])
    assert teacher_cache(run.cfg, s, stages[1], data, False) is None
    run, s, stages = mnist_session(make_config, tmp_path, ["teacher_cache_gb=0.000001"])
    assert teacher_cache(run.cfg, s, stages[1], data, False) is None
    assert teacher_cache(run.cfg, s, backprop_stage(), data, False) is None   # backprop needs no teacher


def loss_and_grads(loss, params):
    return loss.detach(), torch.autograd.grad(loss, params)


def test_the_benchmarks_three_loops_do_the_same_work_on_the_same_batch(make_config, tmp_path):
    """(a) the bare step, (b) our loop's step, with and without the teacher cache, and (c) the conventional
    step give the same loss and the same gradients for the same weights and batch: the benchmark's ratios
    compare the same work."""
    run, s, stages = mnist_session(make_config, tmp_path)
    data = random_split(16, 3)
    x, y = data.x, data.y
    for stage in stages:
        params = bench.params_of(s, stage)
        cache = teacher_cache(run.cfg, s, stage, data, False)
        ours = {"live": batch_targets(s, stage, x, None, None), "cached": batch_targets(s, stage, x, cache, torch.arange(16))}
        steps = {"floor": bench.floor_loss(run.cfg, s, stage, x, y), "conventional": bench.conventional_loss(run.cfg, s, stage, x, y)}
        weights = weights_at(stage, 0)   # lam at stage 2's start, bench.LAM
        steps |= {f"ours {k}": stage_loss(s, stage, x, y, weights, targets)[0] for k, targets in ours.items()}
        expected_loss, expected_grads = loss_and_grads(steps.pop("floor"), params)
        assert len(expected_grads) == len(params) > 0 and all(g.abs().sum() > 0 for g in expected_grads)
        for name, loss in steps.items():
            got_loss, got_grads = loss_and_grads(loss, params)
            torch.testing.assert_close(got_loss, expected_loss, rtol=1e-5, atol=1e-6, msg=f"{stage.name} {name}")
            for got, expected in zip(got_grads, expected_grads):
                torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6, msg=f"{stage.name} {name}")


def test_the_conventional_loaders_images_have_the_models_input_shape():
    for shape, augmented in (((1, 28, 28), False), ((3, 32, 32), True)):
        loader = bench.conventional_loader(shape, 8, 4, augmented)
        image, label = loader.dataset[0]
        assert image.shape == shape and image.dtype == torch.float32 and 0 <= label < 10
        assert loader.batch_size == 4 and loader.drop_last


def test_amp_trains_under_bf16_on_cpu_with_float32_losses(make_config, tmp_path):
    data = random_split(16, 3)
    x, y = data.x, data.y
    losses = {}
    for amp in (False, True):
        run, s, stages = mnist_session(make_config, tmp_path, [f"amp={amp}"])
        for stage in stages:
            with autocast(run.cfg, run.device):
                loss, _, _ = stage_loss(s, stage, x, y, weights_at(stage, 0), batch_targets(s, stage, x, None, None))
                assert s.net(x).dtype == (torch.bfloat16 if amp else torch.float32)
            assert loss.dtype == torch.float32
            losses[amp, stage.name] = loss.item()
    for name in ("hint:conv4<-conv2", "kd"):
        assert losses[True, name] == pytest.approx(losses[False, name], rel=0.02)


def offsets(images, pad):
    """Crop offsets (dy, dx) and flips read back from images whose channels hold row and column indices."""
    h, w = images.shape[-2:]
    c = h // 2
    flipped = images[:, 1, c, c + 1] < images[:, 1, c, c]
    dy = images[:, 0, c, c] - 1 - c + pad
    dx = torch.where(flipped, images[:, 1, c, c] - 1 - (w - 1 - c) + pad, images[:, 1, c, c] - 1 - c + pad)
    return dy.long(), dx.long(), flipped


def test_device_augmentation_matches_torchvision_random_crop_and_flip():
    h = w = 12
    pad = 3
    rows = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w) + 1
    cols = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w) + 1
    image = torch.stack([rows, cols])
    reference = T.Compose([T.RandomCrop(h, padding=pad), T.RandomHorizontalFlip()])
    torch.manual_seed(0)
    theirs = torch.stack([reference(image) for _ in range(4000)])
    ours = augment(image.expand(4000, 2, h, w), pad, flip=True)
    for a, b in zip(offsets(ours, pad), offsets(theirs, pad)):
        pa = torch.bincount(a.long(), minlength=2 * pad + 1).float() / len(a)
        pb = torch.bincount(b.long(), minlength=2 * pad + 1).float() / len(b)
        assert len(pa) == len(pb) and (pa - pb).abs().max() < 0.04
