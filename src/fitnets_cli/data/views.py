"""What a batch looks like on the device: batched resizing and augmentation."""

import torch
import torch.nn.functional as F


def resize(x, side: int):
    """Images (N, C, H, W) resized, bilinear, to (N, C, side, side) on their device (dataset.resize); antialiased
    where that shrinks them, as PIL and torchvision's Resize do. Already that size: returned as they are."""
    h, w = x.shape[-2:]
    if (h, w) == (side, side):
        return x
    return F.interpolate(x, size=(side, side), mode="bilinear", align_corners=False, antialias=side < max(h, w))


def augment(x, pad: int, flip: bool):
    """Zero-pad by `pad`, crop a random window of the original size, flip half the images horizontally.

    Batched on the images' device; each image draws its own offsets and flip.
    """
    n, c, h, w = x.shape
    if pad:
        padded = F.pad(x, (pad, pad, pad, pad))
        dy = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device)
        dx = torch.randint(0, 2 * pad + 1, (n, 1), device=x.device)
        rows = (dy + torch.arange(h, device=x.device))[:, None, :, None]
        cols = (dx + torch.arange(w, device=x.device))[:, None, None, :]
        x = padded[torch.arange(n, device=x.device)[:, None, None, None],
                   torch.arange(c, device=x.device)[None, :, None, None], rows, cols]
    if flip:
        flipped = torch.rand(n, device=x.device) < 0.5
        x = torch.where(flipped[:, None, None, None], x.flip(3), x)
    return x
