"""The schedules of a stage as pure functions of the position in it: the LR and SGD's momentum by epoch and
update (the recipe's Optim). A loss term's weight follows its own ramp (terms.Term.weight_at)."""

import math

from fitnets_cli.config.groups import Optim


def ramp(epoch: int, saturate: int) -> float:
    """0 at epoch 0, rising linearly to 1 at `saturate` and staying there (always 0 when saturate is 0)."""
    return min(epoch / saturate, 1.0) if saturate > 0 else 0.0


def lr_at(optim: Optim, epoch: int, update: int) -> float:
    """The LR at this (0-based) epoch and update of a stage: scaled to the batch (lr_batch); linear decay,
    steps, cosine and warm-up by epoch; pylearn2's exponential decay by update, floored at lr_min."""
    lr = optim.lr * (1 - (1 - optim.lr_decay_factor) * ramp(epoch, optim.lr_decay_saturate))
    if optim.lr_batch:   # the linear scaling rule: the LR is given for lr_batch images
        lr *= optim.batch_size / optim.lr_batch
    lr *= optim.lr_step_factor ** sum(epoch >= step for step in optim.lr_steps)
    if optim.lr_cosine:
        lr = optim.lr_min + (lr - optim.lr_min) * (1 + math.cos(math.pi * epoch / optim.max_epochs)) / 2
    if epoch < optim.warmup_epochs:
        lr *= (epoch + 1) / (optim.warmup_epochs + 1)
    if optim.lr_exp_decay != 1:
        lr = max(lr / optim.lr_exp_decay ** update, optim.lr_min)
    return lr


def momentum_at(optim: Optim, epoch: int) -> float:
    """SGD's momentum at this epoch: momentum, moving linearly to momentum_final by momentum_saturate."""
    return optim.momentum + (optim.momentum_final - optim.momentum) * ramp(epoch, optim.momentum_saturate)
