"""The paper's preprocessing of tensor datasets (global contrast normalisation, ZCA whitening, local contrast
normalisation), cached on disk, and per-channel standardisation."""

from pathlib import Path

import torch
import torch.nn.functional as F

from fitnets_cli.runtime.files import DiskFull, atomic_write
from fitnets_cli.runtime.ui import console


def preprocess(raw: dict, dataset, data) -> dict:
    images = _paper_preprocess(raw, dataset, data)
    return standardize(images, images["train"]) if dataset.normalize else images

def _paper_preprocess(raw: dict, dataset, data) -> dict:
    if dataset.preprocess == "scale":
        return {s: x.float() / 255 for s, (x, _) in raw.items()}
    key = f"{dataset.name}-{dataset.preprocess}-gcn{dataset.gcn_scale:g}"
    key += f"-zca{dataset.zca_bias:g}" if dataset.preprocess == "gcn_zca" else ""
    key += "-extra" if dataset.extra else ""
    cache = Path(data.cache or Path(data.root) / "fitnets_cache") / f"{key}.pt"
    if cache.exists():
        try:
            return torch.load(cache)
        except Exception:   # a damaged cache is recomputed, never trusted
            console.print(f"preprocessing cache {cache} is unreadable; recomputing it")
    images = {s: gcn(x.float(), dataset.gcn_scale) for s, (x, _) in raw.items()}
    if dataset.preprocess == "gcn_zca":
        # Fit on all training images (valid included), as pylearn2's make_cifar10_gcn_whitened.py.
        mean, whiten = zca_fit(images["train"], dataset.zca_bias)
        images = {s: zca_apply(x, mean, whiten) for s, x in images.items()}
    else:
        images = {s: lecun_lcn(x) for s, x in images.items()}
    try:
        atomic_write(cache, lambda tmp: torch.save(images, tmp))
    except (OSError, DiskFull) as err:
        reason = "the disk is full" if isinstance(err, DiskFull) else err.strerror
        console.print(f"could not cache the preprocessed data at {cache} ({reason}); "
                      "set data.cache=DIR to a writable folder to skip this work next time")
    return images

def gcn(x, scale: float):
    """Global contrast normalisation: per image, subtract its mean, divide by its L2 norm, times `scale`."""
    flat = x.flatten(1)
    flat = flat - flat.mean(1, keepdim=True)
    norm = flat.norm(dim=1, keepdim=True).clamp_min(1e-8)
    return (scale * flat / norm).view_as(x)

def standardize(images: dict, train) -> dict:
    """Per channel, subtract the training images' mean and divide by their standard deviation (the CRD
    benchmark normalises CIFAR-100 so, with fixed constants; here they are computed from the images)."""
    std, mean = torch.std_mean(train, dim=(0, 2, 3), keepdim=True)
    return {s: (x - mean) / std for s, x in images.items()}

def zca_fit(x, bias: float, batch: int = 5000):
    """ZCA whitening fit: per-feature mean and P = V diag(1/sqrt(eig)) V^T of cov + bias*I.
    Accumulated in float64 over batches, so no float64 copy of the whole dataset is ever held."""
    flat = x.flatten(1)
    chunks = lambda: (flat[i:i + batch].double() for i in range(0, len(flat), batch))
    mean = sum(c.sum(0) for c in chunks()) / len(flat)
    cov = sum((c - mean).T @ (c - mean) for c in chunks()) / len(flat)
    cov += bias * torch.eye(flat.shape[1], dtype=cov.dtype)
    eig, vec = torch.linalg.eigh(cov)
    return mean.float(), (vec @ torch.diag(eig.rsqrt()) @ vec.T).float()

def zca_apply(x, mean, whiten, batch: int = 10000):
    """Apply a ZCA fit, in batches to bound memory."""
    flat = x.flatten(1)
    out = torch.cat([(flat[i:i + batch] - mean) @ whiten for i in range(0, len(flat), batch)])
    return out.view_as(x)

def lecun_lcn(x, kernel: int = 7, threshold: float = 1e-4, batch: int = 10000):
    """LeCun local contrast normalisation per channel, as pylearn2's lecun_lcn (Gaussian sigma 2)."""
    mid = kernel // 2
    grid = torch.arange(kernel, dtype=torch.float32) - mid
    g = torch.exp(-(grid[:, None] ** 2 + grid[None, :] ** 2) / (2 * 2.0 ** 2))
    c = x.shape[1]
    w = (g / g.sum()).expand(c, 1, kernel, kernel)
    out = []
    for i in range(0, len(x), batch):
        xb = x[i:i + batch]
        centred = xb - F.conv2d(xb, w, padding=mid, groups=c)
        denom = F.conv2d(xb ** 2, w, padding=mid, groups=c).sqrt()
        divisor = torch.maximum(denom.mean((2, 3), keepdim=True), denom).clamp_min(threshold)
        out.append(centred / divisor)
    return torch.cat(out)
