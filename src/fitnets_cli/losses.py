"""The paper's losses as plain functions."""

import torch.nn.functional as F


def hint_loss(hint, pred, reduction: str = "paper"):
    """Eq. 3: half the squared distance between the teacher's hint and the regressed guided map.

    code: the authors' HintCost, summed over map rows and averaged over everything else. paper: summed over
    each example's map, averaged over the batch: C x W times larger, which under RMSProp is not a mere
    rescaling (see conf/hints/paper.yaml).
    """
    sq = 0.5 * (hint.float() - pred.float()).pow(2)   # in float32 even under bf16 autocast
    if reduction == "paper":
        return sq.flatten(1).sum(1).mean()
    return sq.sum(2).mean()


def kd_loss(student_logits, teacher_logits, labels, tau: float, lam: float):
    """Eq. 2: CE(labels, P_S) + lam * CE(P_T^tau, P_S^tau), no tau^2 factor (as the authors' KDCost).

    Returns (total, hard cross-entropy, soft cross-entropy).
    """
    # float32 even under bf16 autocast: on CPU, autocast leaves softmax in bf16
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    ce = F.cross_entropy(student_logits, labels)
    soft = -(F.softmax(teacher_logits / tau, 1) * F.log_softmax(student_logits / tau, 1)).sum(1).mean()
    return ce + lam * soft, ce, soft


def lam_at(epoch: int, kd) -> float:
    """lam for a (0-based) stage-2 epoch: lam_start until lam_start_epoch, then linear to lam_end."""
    if epoch <= kd.lam_start_epoch:
        return kd.lam_start
    if epoch >= kd.lam_end_epoch:
        return kd.lam_end
    t = (epoch - kd.lam_start_epoch) / (kd.lam_end_epoch - kd.lam_start_epoch)
    return kd.lam_start + (kd.lam_end - kd.lam_start) * t
