"""Scoring a network on a split: test and validation loss, accuracy and error."""

import torch
import torch.nn.functional as F

from fitnets_cli.runtime import dist


@torch.no_grad()
def evaluate(net, split, batch_size: int = 1000) -> dict:
    """Cross-entropy, accuracy and error of `net` on a split (data.Resident or streaming.Streamed), in eval mode."""
    was_training = net.training
    net.eval()
    device = next(net.parameters()).device
    loss = torch.zeros((), device=device)
    correct = torch.zeros((), device=device)
    for x, y, _, _ in split.batches(batch_size):
        logits = net(x)
        loss += F.cross_entropy(logits, y, reduction="sum")
        correct += (logits.argmax(1) == y).sum()
    net.train(was_training)
    loss, correct = dist.sum_(loss), dist.sum_(correct)
    acc = correct.item() / len(split)
    return {"loss": loss.item() / len(split), "acc": acc, "error": 1 - acc}
