"""Two loss terms of your own, for `fitnets train` (docs/methods.md): put this file's folder on PYTHONPATH and
name a term by its dotted path, `_target_: my_terms.logit_mse` or `_target_: my_terms.ProjectedHint`."""

import torch.nn.functional as F
from torch import nn


def logit_mse(student, teacher, labels, scale: float = 1.0):
    """Logit matching (Ba & Caruana, 2014): the mean squared difference of the two networks' logits. Name its taps
    as `student: [logits]` and `teacher: [logits]`."""
    return scale * F.mse_loss(student[0], teacher[0])


class ProjectedHint(nn.Module):
    """A hint through a learnt projector: the student's map average-pooled to the teacher's size, a 1x1 conv to its
    channels, then the mean squared difference of the L2-normalised maps, summed over the pairs. The projectors
    train with the student and are saved beside it (checkpoints/term-*.pt)."""

    def __init__(self, student_shapes, teacher_shapes, normalize: bool = True):
        super().__init__()
        if len(student_shapes) != len(teacher_shapes) or any(len(s) != 3 for s in student_shapes + teacher_shapes):
            raise ValueError("ProjectedHint joins (C, H, W) maps in pairs")
        self.sizes = [tuple(t[1:]) for t in teacher_shapes]
        self.projectors = nn.ModuleList(nn.Conv2d(s[0], t[0], 1) for s, t in zip(student_shapes, teacher_shapes))
        self.normalize = normalize

    def forward(self, student, teacher, labels):
        total = 0.0
        for f_s, f_t, size, project in zip(student, teacher, self.sizes, self.projectors):
            f_s = project(F.adaptive_avg_pool2d(f_s, size))
            if self.normalize:
                f_s, f_t = F.normalize(f_s.flatten(1), dim=1), F.normalize(f_t.flatten(1), dim=1)
            total = total + F.mse_loss(f_s, f_t)
        return total
