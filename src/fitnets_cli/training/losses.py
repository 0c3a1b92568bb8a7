"""The paper's losses as plain functions."""

import torch.nn.functional as F


def hint_loss(hint, pred, reduction: str = "code"):
    """Eq. 3: half the squared distance between the teacher's hint and the regressed guided map.

    code: the authors' HintCost, summed over map rows and averaged over everything else. paper: summed over
    each example's map, averaged over the batch: C x W times larger, which under RMSProp is not a mere
    rescaling (see conf/hints/paper.yaml). mse: the CRD benchmark's, the mean squared error (no half).
    """
    diff = hint.float() - pred.float()   # in float32 even under bf16 autocast
    if reduction == "mse":
        return diff.pow(2).mean()
    sq = 0.5 * diff.pow(2)
    if reduction == "paper":
        return sq.flatten(1).sum(1).mean()
    return sq.sum(2).mean()


def kd_loss(student_logits, teacher_logits, labels, tau: float, lam: float, form: str = "paper",
            ce_weight: float = 1.0):
    """Knowledge distillation; returns (total, hard cross-entropy, soft term).

    paper (Eq. 2, the authors' KDCost): ce_weight * CE(labels, P_S) + lam * CE(P_T^tau, P_S^tau), no tau^2.
    hinton (Hinton et al., as the CRD benchmark): ce_weight * CE + lam * tau^2 * KL(P_T^tau || P_S^tau).
    """
    # float32 even under bf16 autocast: on CPU, autocast leaves softmax in bf16
    student_logits, teacher_logits = student_logits.float(), teacher_logits.float()
    ce = F.cross_entropy(student_logits, labels)
    log_ps = F.log_softmax(student_logits / tau, 1)
    if form == "hinton":
        soft = F.kl_div(log_ps, F.log_softmax(teacher_logits / tau, 1), reduction="batchmean", log_target=True) * tau**2
    else:
        soft = -(F.softmax(teacher_logits / tau, 1) * log_ps).sum(1).mean()
    return ce_weight * ce + lam * soft, ce, soft
