"""Loss terms: the hint family's baselines against their reference formulas on hand-computed values, the presets
as data, your own term by dotted path (a function, an nn.Module with parameters) through both stages, and the
one-line errors of bad terms."""

import json
import math
import signal
import sys
from pathlib import Path

import pytest
import torch

from fitnets_cli.config.groups import TERMS as TERM_NAMES
from fitnets_cli.training.losses import at_loss, dkd_loss, pkt_loss, sp_loss
from fitnets_cli.training.terms import TERMS
from helpers import (failure, fitnets, in_stage, main, mnist_session, signal_when, stage_of, start, tiny_overrides,
                     write_tiny_mnist)

EXAMPLES = Path(__file__).parents[1] / "docs" / "examples"
LOGIT_MSE = "{_target_: my_terms.logit_mse, student: [logits], teacher: [logits], weight: 0.5}"
PROJECTED = "{_target_: my_terms.ProjectedHint, weight: 2.0}"


def schedule(*stage2_terms, stage1="{term: hint}") -> str:
    """schedule.stages as an override: the paper's hint stage, then CE + KD + the given terms."""
    terms = ", ".join(["{term: ce}", "{term: kd}", *stage2_terms])
    return (f"schedule.stages=[{{name: hint, train: guided, per_pair: true, terms: [{stage1}]}}, "
            f"{{name: kd, terms: [{terms}]}}]")


def close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7)


def softmax(v):
    return [math.exp(x) / sum(math.exp(z) for z in v) for x in v]


def normalised(v):
    n = math.sqrt(sum(x * x for x in v))
    return [x / n for x in v]


def test_the_built_in_terms_are_the_ones_the_config_accepts():
    assert set(TERMS) == set(TERM_NAMES)


def test_attention_transfer_is_the_reference_formula():
    # RepDistiller AT.py: at(f) = normalize(mean_c f^2, flattened); loss = mean((at_s - at_t)^2).
    f_s = torch.tensor([[[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [1.0, 0.0]]]])        # (1, 2, 2, 2)
    f_t = torch.ones(1, 3, 2, 2)
    a_s = normalised([(1 + 0) / 2, (4 + 1) / 2, (9 + 1) / 2, (16 + 0) / 2])
    a_t = normalised([1.0] * 4)
    assert close(at_loss(f_s, f_t).item(), sum((s - t) ** 2 for s, t in zip(a_s, a_t)) / 4)
    # The larger map is average-pooled to the smaller's size first.
    big = torch.arange(16.0).reshape(1, 1, 4, 4)
    pooled = [sum(big[0, 0, i:i + 2, j:j + 2].flatten().tolist()) / 4 for i in (0, 2) for j in (0, 2)]
    a_big = normalised([v * v for v in pooled])
    small = torch.tensor([[[[1.0, 0.0], [0.0, 1.0]]]])
    assert close(at_loss(big, small).item(), sum((s - t) ** 2 for s, t in zip(a_big, normalised([1, 0, 0, 1]))) / 4)


def test_similarity_preserving_is_the_reference_formula():
    # RepDistiller SP.py: G = f f^T, rows L2-normalised; loss = ||G_t - G_s||_F^2 / batch^2.
    f_s, f_t = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    g_s = [normalised([1.0, 1.0]), normalised([1.0, 2.0])]
    g_t = [[1.0, 0.0], [0.0, 1.0]]
    expected = sum((t - s) ** 2 for rs, rt in zip(g_s, g_t) for s, t in zip(rs, rt)) / 4
    assert close(sp_loss(f_s, f_t).item(), expected)
    assert close(sp_loss(f_s.reshape(2, 1, 1, 2), f_t.reshape(2, 3, 1, 1)).item(), expected)   # maps flatten


def test_probabilistic_knowledge_transfer_is_the_reference_formula():
    # RepDistiller PKT.py: cosine similarities scaled to [0, 1], rows made distributions, mean of p_t log(p_t/p_s).
    f_s, f_t = torch.tensor([[1.0, 0.0], [1.0, 1.0]]), torch.tensor([[2.0, 0.0], [0.0, 3.0]])
    c = 1 / math.sqrt(2)
    rows = lambda m: [[v / sum(r) for v in r] for r in m]
    p_s = rows([[1.0, (c + 1) / 2], [(c + 1) / 2, 1.0]])
    p_t = rows([[1.0, 0.5], [0.5, 1.0]])
    expected = sum(t * math.log(t / s) for rs, rt in zip(p_s, p_t) for s, t in zip(rs, rt)) / 4
    assert close(pkt_loss(f_s, f_t).item(), expected)


def test_decoupled_kd_is_the_reference_formula():
    # mdistiller DKD.py: TCKD = T^2 KL(b_t || b_s) of the (target, rest) split; NCKD = T^2 KL over the other
    # classes' renormalised probabilities; alpha TCKD + beta NCKD, batch mean.
    s, t, label, tau, alpha, beta = [1.0, 2.0, 0.0], [3.0, 0.0, 0.0], 1, 2.0, 1.0, 8.0
    p_s, p_t = softmax([v / tau for v in s]), softmax([v / tau for v in t])
    b_s, b_t = [p_s[label], 1 - p_s[label]], [p_t[label], 1 - p_t[label]]
    tckd = sum(q * math.log(q / p) for p, q in zip(b_s, b_t)) * tau**2
    q_s, q_t = softmax([s[0] / tau, s[2] / tau]), softmax([t[0] / tau, t[2] / tau])
    nckd = sum(q * math.log(q / p) for p, q in zip(q_s, q_t)) * tau**2
    got = dkd_loss(torch.tensor([s]), torch.tensor([t]), torch.tensor([label]), alpha, beta, tau)
    assert close(got.item(), alpha * tckd + beta * nckd)


def test_the_presets_plan_their_terms_weights_and_taps(make_config, tmp_path):
    run, s, stages = mnist_session(make_config, tmp_path)
    hint, kd = stages
    assert (hint.name, hint.train, [t.name for t in hint.terms]) == ("hint:conv4<-conv2", "guided", ["hint"])
    assert (hint.student_taps, hint.teacher_taps) == (["conv4"], ["conv2"])
    assert [(t.name, t.student, t.teacher) for t in kd.terms] == [("ce", [None], []), ("kd", [None], [None])]
    # lam, the kd term's weight, is recipe.kd's: 4 -> 1 over the paper's MNIST epochs 0-149
    assert kd.terms[1].weight == (4.0, 1.0, 0, 149) and kd.terms[1].kwargs == {"tau": 3.0, "form": "paper"}
    # The CRD benchmark's KD: 0.1 x CE + 0.9 x tau^2 KL at tau 4, all along.
    run, s, [stage] = mnist_session(make_config, tmp_path, ["recipe=cifar100_crd", "schedule=kd"])
    assert [t.weight_at(0) for t in stage.terms] == [0.1, 0.9] and stage.terms[1].kwargs["form"] == "hinton"
    run, s, [dkd] = mnist_session(make_config, tmp_path, ["schedule=dkd"])
    assert [round(dkd.terms[1].weight_at(e), 6) for e in (0, 1, 19, 30)] == [0.05, 0.1, 1.0, 1.0]   # mdistiller's warm-up


def test_layers_prints_each_stage_with_its_terms_and_what_it_trains(tmp_path):
    out = main("layers", "dataset=mnist", "student=fitnet_mnist", "schedule=at_kd")
    assert "at_kd" in out and "the student" in out
    assert "1 x ce(logits)" in out and "4->1 (epochs 0-149) x kd(logits | logits)" in out
    assert "1000 x at(conv4 | conv2)" in out
    out = main("layers", "dataset=mnist", "student=fitnet_mnist")
    assert "hint:conv4<-conv2" in out and "the student up to conv4 + regressors" in out


@pytest.fixture
def taught(teacher):
    """The session's tiny MNIST and teacher (conftest), with the MNIST FitNet's overrides."""
    root, base = teacher
    return root, base + ["student=fitnet_mnist", "recipe.student.max_epochs=2", "recipe.student.init_range=0.05",
                         "deterministic=true"]


@pytest.fixture
def my_terms(monkeypatch):
    """docs/examples on sys.path (in-process runs) and on PYTHONPATH (subprocesses)."""
    monkeypatch.syspath_prepend(str(EXAMPLES))
    monkeypatch.setenv("PYTHONPATH", f"{EXAMPLES}:{':'.join(sys.path)}")


@pytest.mark.slow
def test_your_own_terms_train_through_both_stages_and_their_parameters_are_saved(taught, my_terms, tmp_path):
    _, base = taught
    run = tmp_path / "run"
    out = main("train", *base, schedule(LOGIT_MSE, PROJECTED), f"hydra.run.dir={run}")
    assert "0.5 x logit_mse(logits | logits)" in out and "2 x ProjectedHint(conv4 | conv2)" in out
    m = json.loads((run / "metrics.json").read_text())
    record = m["stages"][1]["history"][-1]
    assert {"train_ce", "train_kd", "train_logit_mse", "train_ProjectedHint"} <= set(record)
    assert all(math.isfinite(record[k]) for k in ("train_logit_mse", "train_ProjectedHint"))
    [saved] = (run / "checkpoints").glob("term-*.pt")
    projector = torch.load(saved, weights_only=True)
    assert set(projector) == {"projectors.0.weight", "projectors.0.bias"}
    assert projector["projectors.0.weight"].shape == (48, 16, 1, 1)   # the guided conv4 to the hint conv2's channels
    assert projector["projectors.0.weight"].abs().sum() > 0
    evaluated = main("eval", f"checkpoint={run / 'checkpoints' / 'student.pt'}", base[1], "device=cpu")
    assert f"{m['test']['acc']:.2%}" in evaluated


@pytest.mark.slow
def test_a_run_with_a_module_term_resumes_bit_identically(taught, my_terms, tmp_path):
    _, base = taught
    args = ["train", *base, schedule(PROJECTED), "recipe.student.max_epochs=3"]
    fitnets(*args, f"hydra.run.dir={tmp_path / 'whole'}")
    proc = start(*args, f"hydra.run.dir={tmp_path / 'cut'}")
    last = tmp_path / "cut" / "checkpoints" / "last.pt"
    signal_when(proc, last, lambda st: stage_of(st) == 1 and in_stage(st) is not None and in_stage(st)["epoch"] >= 1,
                signal.SIGTERM)
    assert proc.wait(timeout=300) == 128 + signal.SIGTERM
    fitnets("train", f"resume={tmp_path / 'cut'}")
    whole, cut = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in ("whole", "cut"))
    assert [h["train_ProjectedHint"] for h in whole["stages"][1]["history"]] == \
        [h["train_ProjectedHint"] for h in cut["stages"][1]["history"]]
    for name in ("student.pt",) + tuple(p.name for p in (tmp_path / "whole" / "checkpoints").glob("term-*.pt")):
        a, b = (torch.load(tmp_path / d / "checkpoints" / name, weights_only=True) for d in ("whole", "cut"))
        a, b = a.get("state_dict", a), b.get("state_dict", b)
        assert all(torch.equal(a[k], b[k]) for k in a), name


@pytest.mark.slow
def test_your_own_term_trains_a_timm_pair_by_config_alone(tmp_path, my_terms):
    base = tiny_overrides(write_tiny_mnist(tmp_path / "data"), tmp_path / "teachers")
    teacher = ["teacher=timm", "teacher.arch=test_vit", "+teacher.patch_size=4", "+teacher.img_size=28",
               "recipe.teacher.lr=0.001", "recipe.teacher.max_epochs=1"]
    student = ["student=timm", "student.arch=test_resnet", "recipe.student.lr=0.001", "recipe.student.max_epochs=1",
               "hints.regressor=auto", "hints.pairs=[{hint: null, guided: null}]"]
    main("train-teacher", *base, *teacher, f"hydra.run.dir={tmp_path / 'vit'}")
    run = tmp_path / "run"
    main("train", *base, *teacher, *student, schedule(LOGIT_MSE, PROJECTED, stage1=PROJECTED), f"hydra.run.dir={run}")
    m = json.loads((run / "metrics.json").read_text())
    assert [s["name"] for s in m["stages"]][1] == "kd" and "train_ProjectedHint" in m["stages"][0]["history"][0]
    assert len(list((run / "checkpoints").glob("term-*.pt"))) == 2   # stage 1's projector and stage 2's
    main("eval", f"checkpoint={run / 'checkpoints' / 'student.pt'}", base[1], "device=cpu")


BAD = {
    "not_a_callable": ("PI = 3.14", "{_target_: bad_terms.PI}", "is a float, not a function or an nn.Module class"),
    "missing": ("", "{_target_: bad_terms.nothing}", "cannot be imported"),
    "non_scalar": ("def term(student, teacher, labels):\n    return student[0]",
                   "{_target_: bad_terms.term}", "it returned a tensor of shape (4, 16, 4, 4); a term returns a scalar"),
    "nan": ("import torch\ndef term(student, teacher, labels):\n    return torch.tensor(float('nan'))",
            "{_target_: bad_terms.term}", "it returned nan on random inputs"),
    "refuses": ("class Term(__import__('torch').nn.Module):\n    def __init__(self, s, t):\n        super().__init__()\n"
                "        raise ValueError('needs vectors')", "{_target_: bad_terms.Term}",
                "term Term on student 4x4x16 / teacher 4x4x48: it failed (ValueError: needs vectors)"),
    "missing_tap": ("", "{term: at, student: [conv9], teacher: [conv2]}", "term at's student layer 'conv9' does not exist"),
    "logits_in_stage_one": ("", "{term: kd}", "train=guided trains the student up to the taps its terms read"),
}


@pytest.mark.parametrize("case", BAD)
def test_bad_terms_stop_in_one_line_before_anything_is_written(case, tmp_path, monkeypatch):
    source, term, message = BAD[case]
    (tmp_path / "bad_terms.py").write_text(source + "\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    sys.modules.pop("bad_terms", None)
    out = tmp_path / "run"
    stage2 = () if case == "logits_in_stage_one" else (term,)
    line = failure("train", "dataset=mnist_subset", "student=fitnet_mnist", "device=cpu",
                   schedule(*stage2, stage1=term if case == "logits_in_stage_one" else "{term: hint}"),
                   f"teacher_store={tmp_path / 'none'}", f"hydra.run.dir={out}")
    assert message in line, line
    assert not out.exists()


def test_a_schedule_of_your_own_in_a_file_is_found_through_hydras_search_path(tmp_path, my_terms, monkeypatch):
    (tmp_path / "conf" / "schedule").mkdir(parents=True)
    (tmp_path / "conf" / "schedule" / "mine.yaml").write_text(
        "name: mine\nstages:\n  - name: kd\n    terms:\n      - {term: ce}\n      - {term: kd}\n"
        f"      - {LOGIT_MSE}\n")
    monkeypatch.chdir(tmp_path)
    out = main("layers", "dataset=mnist", "student=fitnet_mnist", "schedule=mine", "hydra.searchpath=[file://conf]")
    assert "│ kd " in out and "0.5 x logit_mse(logits | logits)" in out


def test_compare_sets_the_hint_familys_published_figures_under_runs_of_a_benchmark_pair():
    from fitnets_cli.commands.benchmark import benchmark_records, benchmark_table

    run = {"role": "student", "dataset": "cifar100", "teacher": "resnet32x4", "model": "resnet8x4", "seeds": 1,
           "test_acc": 73.0, "test_acc_last": 72.5}
    rows = [{**run, "schedule": method} for method in ("dkd", "at", "pkt", "sp")]
    header, lines = benchmark_table(benchmark_records(rows), "accuracy")
    assert header == ["method", "resnet32x4 -> resnet8x4"]
    # RepDistiller's README (AT, SP, PKT) and mdistiller's (DKD), after the methods in METHODS' order
    assert [line for line in lines if line[0] in ("AT", "SP", "PKT", "DKD") or line[0] == "  published"][-8:] == [
        ["AT", "72.50 (73.00)"], ["  published", "73.44"], ["SP", "72.50 (73.00)"], ["  published", "72.94"],
        ["PKT", "72.50 (73.00)"], ["  published", "73.64"], ["DKD", "72.50 (73.00)"], ["  published", "76.32"]]


def test_a_term_past_the_end_of_its_stage_gets_a_line_that_says_so(tmp_path):
    # schedule=fitnets's first stage has one term: an override of a second one (as a sweep over schedule=dkd
    # might try) would append an empty term.
    line = failure("train", "dataset=mnist_subset", "schedule.stages.0.terms.1.weight=1.0", f"hydra.run.dir={tmp_path}")
    assert "schedule.stages.0.terms.1.weight names a TermSpec that the composed list does not have" in line
