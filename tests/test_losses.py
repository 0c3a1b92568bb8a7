import math
from types import SimpleNamespace

import pytest
import torch

from fitnets_cli.config.groups import KD, TermSpec
from fitnets_cli.training.losses import hint_loss, kd_soft
from fitnets_cli.training.terms import plan_term


def lam_at(epoch, kd: KD) -> float:
    """The kd term's weight (the paper's lam) at this epoch, as the term is planned from recipe.kd."""
    cfg = SimpleNamespace(hints=None, recipe=SimpleNamespace(kd=kd))
    return plan_term(TermSpec(term="kd"), [], cfg, None, None, "test").weight_at(epoch)


def test_hint_loss_is_zero_for_identical_maps_and_half_the_squared_distance_otherwise():
    a = torch.randn(3, 4, 5, 5)
    assert hint_loss(a, a.clone()) == 0
    b = a + 2.0
    assert hint_loss(a, b, "paper").item() == pytest.approx(0.5 * 4 * 4 * 5 * 5)   # per example, batch mean
    assert hint_loss(a, b, "code").item() == pytest.approx(0.5 * 4 * 5)            # rows summed, rest averaged


def test_kd_soft_term_matches_a_hand_computation():
    s = torch.tensor([[1.0, 2.0, 0.0]])
    t = torch.tensor([[3.0, 0.0, 0.0]])
    y = torch.tensor([1])
    tau = 3.0
    softmax = lambda v: [math.exp(x) / sum(math.exp(z) for z in v) for x in v]
    ps = softmax([1.0, 2.0, 0.0])
    pt_tau = softmax([1.0, 0.0, 0.0])                  # teacher logits / 3
    ps_tau = softmax([1 / 3, 2 / 3, 0.0])
    ce = -math.log(ps[1])
    soft = -sum(p * math.log(q) for p, q in zip(pt_tau, ps_tau))
    assert kd_soft(s, t, tau).item() == pytest.approx(soft, rel=1e-6)   # no tau^2 factor
    assert torch.nn.functional.cross_entropy(s, y).item() == pytest.approx(ce, rel=1e-6)


def test_lam_schedule_paper_and_code_settings(make_config):
    # The paper's MNIST schedule: 4 -> 1 over the first 150 epochs (0-based epochs 0..149).
    paper = make_config("train", ["dataset=mnist"]).recipe.kd
    assert [lam_at(e, paper) for e in (0, 149, 150, 400)] == [4, 1, 1, 1]
    assert lam_at(74.5, paper) == pytest.approx(2.5) and 1 < lam_at(148, paper) < 1.03
    cifar = make_config("train", ["dataset=cifar10"]).recipe.kd
    assert lam_at(0, cifar) == 4 and lam_at(499, cifar) == 1 and lam_at(498, cifar) > 1


def teacher_decay_over_epoch(start, saturate, lam0, final, epochs):
    """The authors' extensions/TeacherDecayOverEpoch.py, replayed as pylearn2 drives it: setup() at count 0,
    then on_monitor() once before the first epoch and once after each, so epoch e trains at count e + 1."""
    step = (lam0 - final) / (saturate - start + 1)
    lam = lambda count: max(0.0, lam0 if count < start else
                            (lam0 - step * (count - start + 1) if count < saturate else final))
    return [lam(epoch + 1) for epoch in range(epochs)]


@pytest.mark.parametrize("start, saturate, final, overrides", [
    (5, 400, 1.0, dict(lam_start_epoch=3, lam_end_epoch=399)),                 # CIFAR yamls
    (5, 150, 0.0, dict(lam_start_epoch=3, lam_end_epoch=149, lam_end=0.0)),    # MNIST yaml
])
def test_lam_overrides_in_the_recipes_replay_the_authors_schedule(start, saturate, final, overrides):
    kd = KD(**{"lam_start": 4.0, "lam_end": 1.0, **overrides})
    expected = teacher_decay_over_epoch(start, saturate, 4.0, final, 500)
    assert [lam_at(e, kd) for e in range(500)] == pytest.approx(expected, abs=1e-12)


def test_kd_soft_term_of_bf16_logits_is_computed_in_float32():
    g = torch.Generator().manual_seed(0)
    student, teacher = (torch.randn(64, 10, generator=g).mul(5).bfloat16() for _ in range(2))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = kd_soft(student, teacher, 3.0)
    expected = kd_soft(student.float(), teacher.float(), 3.0)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
