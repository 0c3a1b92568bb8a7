import pytest
import torch

from fitnets_cli.commands.compare import load_student
from fitnets_cli.config.groups import Layer, Network
from fitnets_cli.networks.build import build_network, count
from fitnets_cli.networks.maxout import Maxout, build_net

STUDENTS = ["fitnet1", "fitnet2", "fitnet3", "fitnet4", "fitnet_mnist"] + [
    f"depth{d}_{b}" for d in (5, 7, 9, 11) for b in ("30m", "107m")]


def cifar_teacher(make_config, dataset="cifar10"):
    return make_config("train", [f"dataset={dataset}"]).teacher


@pytest.mark.parametrize("name", STUDENTS)
def test_every_student_builds_and_every_parameter_gets_a_gradient(name):
    shape = (1, 28, 28) if name == "fitnet_mnist" else (3, 32, 32)
    net = build_net(load_student(name).layers, shape, 10, init_range=0.05)
    x = torch.randn(4, *shape)
    logits = net(x)
    assert logits.shape == (4, 10) and torch.isfinite(logits).all()
    torch.nn.functional.cross_entropy(logits, torch.arange(4)).backward()
    for pname, p in net.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("dataset,shape,hint_shape", [
    ("cifar10", (3, 32, 32), (192, 7, 7)), ("mnist", (1, 28, 28), (48, 4, 4)), ("svhn", (3, 32, 32), (128, 6, 6))])
def test_teachers_build_with_the_paper_map_sizes(make_config, dataset, shape, hint_shape):
    teacher = make_config("train", [f"dataset={dataset}"]).teacher
    net = build_net(teacher.layers, shape, 10, init_range=0.05)
    assert net.shapes[teacher.hint] == hint_shape
    net(torch.randn(2, *shape)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


def test_cifar_teacher_maps_follow_ceil_pooling(make_config):
    net = build_net(cifar_teacher(make_config).layers, (3, 32, 32), 10)
    assert [net.shapes[n] for n in ("conv1", "conv2", "conv3")] == [(96, 16, 16), (192, 7, 7), (192, 5, 5)]


def test_mnist_student_maps_match_the_spec():
    net = build_net(load_student("fitnet_mnist").layers, (1, 28, 28), 10)
    assert [net.shapes[f"conv{i}"][1] for i in range(1, 7)] == [24, 10, 12, 4, 8, 3]


# Spec section 2.8 (DERIVED): weights only, FC maxout counted as 2 pieces.
def sizes(spec, in_shape, classes, counting="actual") -> dict:
    """networks.count of the network a spec builds."""
    return count(build_network(spec, in_shape, classes), counting)


@pytest.mark.parametrize("name,params,mults", [
    ("fitnet1", 249_576, 30_150_024),
    ("fitnet2", 861_928, 107_800_000),
    ("fitnet4", 2_540_000, 381_700_000),
])
def test_paper_counts_of_the_cifar_fitnets(name, params, mults):
    c = sizes(load_student(name), (3, 32, 32), 10, counting="paper")
    assert c["layers"] == {"fitnet1": 11, "fitnet2": 11, "fitnet4": 19}[name]
    if name == "fitnet1":   # the spec gives FitNet 1 exactly
        assert (c["params"], c["mults"]) == (params, mults)
    assert c["params"] == pytest.approx(params, rel=0.005)
    assert c["mults"] == pytest.approx(mults, rel=0.001)


@pytest.mark.slow
def test_paper_counts_of_the_teachers(make_config):
    cifar = sizes(cifar_teacher(make_config), (3, 32, 32), 10, counting="paper")
    assert cifar["layers"] == 5 and cifar["params"] == pytest.approx(9.04e6, rel=0.001)
    assert cifar["mults"] == pytest.approx(725.09e6, rel=0.0001)
    mnist = sizes(make_config("train", ["dataset=mnist"]).teacher, (1, 28, 28), 10, counting="paper")
    assert mnist["params"] == 360_816
    svhn = sizes(make_config("train", ["dataset=svhn"]).teacher, (3, 32, 32), 10, counting="paper")
    assert svhn["params"] == pytest.approx(4.93e6, rel=0.002)
    assert sizes(load_student("fitnet_mnist"), (1, 28, 28), 10, counting="paper")["params"] == 29_944


def test_actual_counting_includes_biases_and_all_fc_pieces(make_config):
    teacher = cifar_teacher(make_config)
    actual, paper = (sizes(teacher, (3, 32, 32), 10, c) for c in ("actual", "paper"))
    net = build_net(teacher.layers, (3, 32, 32), 10)
    assert actual["params"] == sum(p.numel() for p in net.parameters())
    assert actual["params"] == pytest.approx(16.2e6, rel=0.01)     # spec 2.8: 5-piece FC
    assert actual["mults"] - paper["mults"] == 4800 * 500 * 3      # the 3 extra FC pieces


def test_flop_counter_counts_a_small_maxout_net_like_a_hand_count():
    layers = [Layer(name="c", kind="conv", out=4, pieces=3, kernel=3, pad=1, pool=2),
              Layer(name="f", kind="fc", out=5, pieces=2), Layer(name="softmax", kind="softmax")]
    c = sizes(Network(name="small", layers=layers), (2, 6, 6), 7)
    conv = 3 * 3 * 2 * (4 * 3) * 6 * 6      # k^2 * C_in * C_out*pieces * H * W
    fc = (4 * 3 * 3) * (5 * 2)
    assert c["mults"] == conv + fc + 5 * 7 and c["flops"] == 2 * c["mults"]


def test_maxout_gradient_equals_amax_gradient_ties_included():
    cases = []
    for pieces in (2, 3):                      # 2 pieces take their own path
        z = torch.randn(3, 4, pieces, 5, 5, dtype=torch.double, requires_grad=True)
        assert torch.autograd.gradcheck(Maxout.apply, (z,))
        tied = torch.randn(3, 4, pieces, 5, 5)
        tied[:, :, 1:] = tied[:, :, :1]        # every position ties across all pieces
        tied[0, 0, -1] += 1.0                  # ... but these, where the last piece wins alone
        tied[1, 1, -1] -= 1.0                  # ... and these, where it loses
        cases += [z.detach().float(), tied]
    for x in cases:
        x = x.clone().requires_grad_(True)
        grad = torch.randn(x.shape[:2] + x.shape[3:])
        torch.testing.assert_close(Maxout.apply(x), x.amax(2), rtol=0, atol=0)
        ours = torch.autograd.grad(Maxout.apply(x), x, grad)[0]
        torch.testing.assert_close(ours, torch.autograd.grad(x.amax(2), x, grad)[0], rtol=0, atol=0)


def test_pooling_layer_keeps_nchw_values_and_gradients_with_ties(make_config):
    """The CPU path pools in channels_last; ties (MNIST's blank background) must pick the same elements."""
    layer = build_net(make_config("train", ["dataset=mnist"]).teacher.layers, (1, 28, 28), 10).layers["conv1"]
    x = torch.zeros(4, 1, 28, 28)
    x[:, :, 10:20, 10:20] = torch.rand(4, 1, 10, 10)          # blank elsewhere: tied maps around it
    x.requires_grad_(True)
    got = layer(x)
    z = layer.map(x).unflatten(1, (layer.spec.out, layer.pieces)).amax(2)
    expected = torch.nn.functional.max_pool2d(z, layer.spec.pool, layer.spec.pool_stride, ceil_mode=True)
    assert got.is_contiguous()
    grad = torch.randn_like(got)
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    torch.testing.assert_close(torch.autograd.grad(got, x, grad)[0], torch.autograd.grad(expected, x, grad)[0],
                               rtol=0, atol=0)
