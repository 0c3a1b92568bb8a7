"""The losses as plain functions: the paper's (hint, KD) and the hint family's baselines (AT, SP, PKT, DKD),
each as its reference implementation computes it. Inputs are cast to float32, also under bf16 autocast."""

import torch
import torch.nn.functional as F


def hint_loss(hint, pred, reduction: str = "code"):
    """Eq. 3: half the squared distance between the teacher's hint and the regressed guided map.

    code: the authors' HintCost, summed over map rows and averaged over everything else. paper: summed over
    each example's map, averaged over the batch: C x W times larger, which under RMSProp is not a mere
    rescaling (see conf/hints/paper.yaml). mse: the CRD benchmark's, the mean squared error (no half).
    """
    diff = hint.float() - pred.float()
    if reduction == "mse":
        return diff.pow(2).mean()
    sq = 0.5 * diff.pow(2)
    if reduction == "paper":
        return sq.flatten(1).sum(1).mean()
    return sq.sum(2).mean()


def kd_soft(student_logits, teacher_logits, tau: float, form: str = "paper"):
    """The soft term of knowledge distillation, which lam weighs beside the cross-entropy.

    paper (Eq. 2, the authors' KDCost): CE(P_T^tau, P_S^tau), no tau^2.
    hinton (Hinton et al., as the CRD benchmark): tau^2 * KL(P_T^tau || P_S^tau).
    """
    # float32: on CPU, autocast leaves softmax in bf16
    log_ps = F.log_softmax(student_logits.float() / tau, 1)
    teacher_logits = teacher_logits.float()
    if form == "hinton":
        return F.kl_div(log_ps, F.log_softmax(teacher_logits / tau, 1), reduction="batchmean", log_target=True) * tau**2
    return -(F.softmax(teacher_logits / tau, 1) * log_ps).sum(1).mean()


def attention_map(f, p: float = 2):
    """Zagoruyko & Komodakis's spatial attention: the channel mean of |f|^p, flattened and L2-normalised."""
    return F.normalize(f.float().pow(p).mean(1).flatten(1))


def at_loss(f_s, f_t, p: float = 2):
    """Attention transfer (RepDistiller's distiller_zoo/AT.py): the mean squared difference of the two
    attention maps, the larger map average-pooled to the smaller's size first."""
    if f_s.shape[2:] != f_t.shape[2:]:
        small = tuple(map(min, f_s.shape[2:], f_t.shape[2:]))
        f_s, f_t = F.adaptive_avg_pool2d(f_s.float(), small), F.adaptive_avg_pool2d(f_t.float(), small)
    return (attention_map(f_s, p) - attention_map(f_t, p)).pow(2).mean()


def sp_loss(f_s, f_t):
    """Similarity-preserving KD (RepDistiller's SP.py): the squared Frobenius distance of the two row-normalised
    batch similarity matrices, over batch size squared."""
    n = f_s.shape[0]
    g_s, g_t = (F.normalize(f @ f.t()) for f in (f_s.float().reshape(n, -1), f_t.float().reshape(n, -1)))
    return (g_t - g_s).pow(2).sum() / (n * n)


def pkt_loss(f_s, f_t, eps: float = 1e-7):
    """Probabilistic knowledge transfer (RepDistiller's PKT.py, from the authors' code): the KL divergence of
    the teacher's from the student's cosine-similarity distributions over the batch, averaged."""
    def distribution(f):
        f = f.float().flatten(1)
        f = f / (f.pow(2).sum(1, keepdim=True).sqrt() + eps)
        f = f.masked_fill(f.isnan(), 0.0)
        similarity = (f @ f.t() + 1) / 2
        return similarity / similarity.sum(1, keepdim=True)
    p_s, p_t = distribution(f_s), distribution(f_t)
    return (p_t * torch.log((p_t + eps) / (p_s + eps))).mean()


def dkd_loss(student_logits, teacher_logits, labels, alpha: float = 1.0, beta: float = 8.0, tau: float = 4.0):
    """Decoupled KD (mdistiller's distillers/DKD.py): alpha x TCKD (target vs the rest, binary) + beta x NCKD
    (among the non-target classes), each a tau^2-scaled KL divergence summed over classes, batch mean."""
    s, t = student_logits.float() / tau, teacher_logits.float() / tau
    gt = F.one_hot(labels, s.shape[1]).bool()
    binary = lambda p: torch.stack([(p * gt).sum(1), (p * ~gt).sum(1)], 1)
    p_s, p_t = binary(F.softmax(s, 1)), binary(F.softmax(t, 1))
    tckd = F.kl_div(torch.log(p_s), p_t, reduction="sum") * tau**2 / len(labels)
    # the target class masked out (-1000 before the softmax), as the reference does
    nckd = F.kl_div(F.log_softmax(s - 1000.0 * gt, 1), F.softmax(t - 1000.0 * gt, 1), reduction="sum")
    nckd = nckd * tau**2 / len(labels)
    return alpha * tckd + beta * nckd
