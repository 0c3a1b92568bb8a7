"""The fast data path and step: teacher caching, batched augmentation, and the benchmark's baseline."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision.transforms as T

from fitnets_cli.data import augment
from fitnets_cli.train import autocast, batch_targets, make_stages, stage_loss, teacher_cache

from test_train import mnist_session, random_split

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
import bench  # noqa: E402


def test_cached_teacher_outputs_equal_live_ones(make_config, tmp_path):
    s, plans = mnist_session(make_config, tmp_path)
    x, _ = random_split(300, 0)
    for stage in make_stages(["hint", "kd"], plans):
        cache = teacher_cache(s, stage, x, "train")
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
    s, plans = mnist_session(make_config, tmp_path, ["amp=true"])
    x, _ = random_split(64, 0)
    idx = torch.tensor([5, 17, 63, 0])
    for stage in make_stages(["hint", "kd"], plans):
        cache = teacher_cache(s, stage, x, "train")
        with autocast(s):
            live = batch_targets(s, stage, x[idx], None, idx)
        for k, cached in batch_targets(s, stage, x[idx], cache, idx).items():
            assert cached.dtype == live[k].dtype == torch.bfloat16
            torch.testing.assert_close(cached, live[k])


def test_caching_switches_off_with_augmentation_or_when_asked(make_config, tmp_path):
    s, plans = mnist_session(make_config, tmp_path, ["dataset.augment.flip=true"])
    [kd] = make_stages(["kd"], plans)
    x, _ = random_split(32, 0)
    assert teacher_cache(s, kd, x, "train") is None          # each step's view differs: never cache
    assert teacher_cache(s, kd, x, "valid") is not None      # validation images are never augmented
    s, plans = mnist_session(make_config, tmp_path, ["teacher_cache=false"])
    assert teacher_cache(s, make_stages(["kd"], plans)[0], x, "train") is None
    s, plans = mnist_session(make_config, tmp_path, ["teacher_cache_gb=0.000001"])
    assert teacher_cache(s, make_stages(["kd"], plans)[0], x, "train") is None
    assert teacher_cache(s, make_stages(["ce"], plans)[0], x, "train") is None   # backprop needs no teacher


def test_fast_and_conventional_loops_give_the_same_loss_on_the_same_batch(make_config, tmp_path):
    s, plans = mnist_session(make_config, tmp_path)
    x, y = random_split(16, 3)
    for stage in make_stages(["hint", "kd"], plans):
        ours, _, _ = stage_loss(s, stage, x, y, 4.0, batch_targets(s, stage, x, None, None))
        cached = teacher_cache(s, stage, x, "train")
        ours_cached, _, _ = stage_loss(s, stage, x, y, 4.0, batch_targets(s, stage, x, cached, torch.arange(16)))
        theirs = bench.conventional_loss(s, stage, x, y)
        torch.testing.assert_close(ours, theirs)
        torch.testing.assert_close(ours_cached, theirs, rtol=1e-5, atol=1e-5)


def test_amp_trains_under_bf16_on_cpu_with_float32_losses(make_config, tmp_path):
    x, y = random_split(16, 3)
    losses = {}
    for amp in (False, True):
        s, plans = mnist_session(make_config, tmp_path, [f"amp={amp}"])
        for stage in make_stages(["hint", "kd"], plans):
            with autocast(s):
                loss, _, _ = stage_loss(s, stage, x, y, 4.0, batch_targets(s, stage, x, None, None))
                assert s.student(x).dtype == (torch.bfloat16 if amp else torch.float32)
            assert loss.dtype == torch.float32
            losses[amp, stage.kind] = loss.item()
    for kind in ("hint", "kd"):
        assert losses[True, kind] == pytest.approx(losses[False, kind], rel=0.02)


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


def test_benchmark_measures_fp32_and_bf16_in_one_run(tmp_path):
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, str(Path(bench.__file__)), "--only", "MNIST", "--steps", "1", "--amp", "both",
                    "--json", str(out), "--tb", str(tmp_path / "tb")], check=True, capture_output=True)
    report = json.loads(out.read_text())
    rows = {(r["stage"], r["amp"]): r for r in report["results"]}
    assert set(rows) == {(stage, amp) for stage in ("1 (hints)", "2 (KD)") for amp in ("fp32", "bf16")}
    for r in rows.values():
        assert min(r["floor_ips"], r["ours_ips"], r["conventional_ips"]) > 0
        assert r["b_over_a"] == pytest.approx(r["ours_ips"] / r["floor_ips"])
    for r in report["amp_speedups"]:
        expected = rows[r["stage"], "bf16"]["ours_ips"] / rows[r["stage"], "fp32"]["ours_ips"]
        assert r["bf16_over_fp32"] == pytest.approx(expected)
    assert len(report["amp_speedups"]) == 2
