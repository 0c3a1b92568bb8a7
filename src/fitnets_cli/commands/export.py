"""`fitnets export`: a trained teacher or student out of the tool, as safetensors weights, TorchScript, ONNX or a
torch.export program (pt2). Each file is checked before it takes its name: the exported model's logits on a
batch of real test images must equal the checkpoint's. A JSON sidecar says what the model takes and returns."""

import importlib
import json
from pathlib import Path

import torch

from fitnets_cli.config.commands import ExportConfig
from fitnets_cli.config.errors import ConfigError
from fitnets_cli.config.groups import Dataset
from fitnets_cli.data.load import load_data
from fitnets_cli.networks.build import build_network, network_of
from fitnets_cli.networks.checkpoint import load_model, saved_dataset
from fitnets_cli.runtime.files import DiskFull, atomic_write, write_json
from fitnets_cli.runtime.ui import console

SUFFIX = {"safetensors": ".safetensors", "torchscript": ".torchscript.pt", "onnx": ".onnx", "pt2": ".pt2"}
EXTRA = "pip install '.[export]' in the fitnets clone (or pip install onnx onnxscript onnxruntime)"


def save_safetensors(net, example, path: Path, payload: dict) -> None:
    from safetensors.torch import save_model

    save_model(net, str(path), metadata={"fitnets_network": json.dumps(payload["network"]),
                                         "in_shape": json.dumps(list(net.in_shape)),
                                         "num_classes": str(net.num_classes)})


def run_safetensors(path: Path, x):
    """The network rebuilt from the file alone (its metadata names the architecture), with the file's weights."""
    from safetensors import safe_open
    from safetensors.torch import load_model

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    net = build_network(network_of(json.loads(meta["fitnets_network"])), json.loads(meta["in_shape"]),
                        int(meta["num_classes"]))
    load_model(net, str(path))
    return net.eval()(x)


def save_torchscript(net, example, path: Path, payload: dict) -> None:
    torch.jit.trace(net, example, check_trace=False).save(str(path))


def run_torchscript(path: Path, x):
    return torch.jit.load(str(path))(x)


def save_onnx(net, example, path: Path, payload: dict) -> None:
    torch.onnx.export(net, (example,), str(path), input_names=["images"], output_names=["logits"],
                      dynamic_shapes=({0: torch.export.Dim("batch")},), dynamo=True, verbose=False)


def run_onnx(path: Path, x):
    import onnxruntime

    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return torch.from_numpy(session.run(None, {"images": x.numpy()})[0])


def save_pt2(net, example, path: Path, payload: dict) -> None:
    program = torch.export.export(net, (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    with open(path, "wb") as f:   # a file object: torch.export wants a .pt2 name, and the temporary file has none
        torch.export.save(program, f)


def run_pt2(path: Path, x):
    with open(path, "rb") as f:
        return torch.export.load(f).module()(x)


FORMATS = {"safetensors": (save_safetensors, run_safetensors), "torchscript": (save_torchscript, run_torchscript),
           "onnx": (save_onnx, run_onnx), "pt2": (save_pt2, run_pt2)}


def preprocessing(d: Dataset) -> dict:
    """How the images were prepared before the network saw them, which the exported model expects too."""
    if d.images is not None:
        return {"from": "image files, decoded to [0, 1] pixels", "resize_shorter_side": d.images.resize or d.images.size,
                "center_crop": d.images.size, "channels": d.images.channels, "mean": d.images.mean or None,
                "std": d.images.std or None}
    prep = {"scale": "pixels scaled to [0, 1]",
            "gcn_zca": f"global contrast normalisation (scale {d.gcn_scale}) and ZCA whitening (bias {d.zca_bias}) "
                       "fitted on the training split",
            "gcn_lcn": f"global contrast normalisation (scale {d.gcn_scale}) and local contrast normalisation"}
    return {"from": f"the {d.name} tensors as fitnets' data path prepares them", "preprocess": prep[d.preprocess],
            "normalize": "each channel's training mean subtracted, divided by its std" if d.normalize else None,
            "resize": f"then resized (bilinear, antialiased when shrinking) to {d.resize}x{d.resize}"
                      if d.resize else None}


def test_batch(cfg: ExportConfig, dataset: Dataset):
    """A batch of real test images of the checkpoint's dataset, prepared as in training."""
    data = load_data(dataset, cfg.data, torch.device("cpu"))
    if data.test is None or len(data.test) == 0:
        raise ConfigError(f"dataset {dataset.name} has no test images to check the export on")
    x, _, _, _ = next(iter(data.test.batches(min(cfg.check_images, len(data.test)))))
    return x.float()


def export_command(cfg: ExportConfig) -> dict:
    """Write checkpoint=PATH as format=..., check its logits against the checkpoint's, write the sidecar."""
    if not cfg.checkpoint:
        raise ConfigError("export needs checkpoint=PATH (a run's checkpoints/student.pt or a teacher store's file)")
    for package in ("onnx", "onnxscript", "onnxruntime") if cfg.format == "onnx" else ():
        try:
            importlib.import_module(package)
        except ImportError:
            raise ConfigError(f"format=onnx needs {package}, which is not installed: {EXTRA}") from None
    net, payload = load_model(cfg.checkpoint, torch.device("cpu"))
    net.eval()
    dataset = saved_dataset(payload)
    out = Path(cfg.out) if cfg.out else Path(cfg.checkpoint).with_suffix(SUFFIX[cfg.format])
    x = test_batch(cfg, dataset)
    with torch.no_grad():
        expected = net(x)
    save, run = FORMATS[cfg.format]
    check = {}

    def write(tmp: Path):
        try:
            with torch.no_grad():
                save(net, x[:2], tmp, payload)
                got = run(tmp, x)
        except Exception as err:
            raise ConfigError(f"{payload['name']} does not export as format={cfg.format} ({type(err).__name__}: "
                              f"{' '.join(str(err).split())[:200]}); try another format (safetensors always works)"
                              ) from None
        diff = (got.float() - expected).abs().max().item()
        check.update(images=len(x), max_abs_diff=diff, rtol=cfg.rtol, atol=cfg.atol)
        if not torch.allclose(got.float(), expected, rtol=cfg.rtol, atol=cfg.atol):
            raise ConfigError(f"the {cfg.format} export of {payload['name']} gives other logits than its checkpoint "
                              f"on {len(x)} test images (max abs difference {diff:.3g} > atol {cfg.atol}, rtol "
                              f"{cfg.rtol}); nothing was written")

    sidecar = out.with_name(out.name + ".json")
    try:
        atomic_write(out, write)
        info = {"file": out.name, "format": cfg.format, "model": payload["name"], "role": payload["role"],
                "checkpoint": str(cfg.checkpoint), "dataset": dataset.name, "num_classes": payload["num_classes"],
                "input": {"shape": ["batch", *payload["in_shape"]], "dtype": "float32", "layout": "NCHW",
                          "preprocessing": preprocessing(dataset)},
                "output": {"shape": ["batch", payload["num_classes"]], "what": "logits (before softmax)"},
                "check": check, "provenance": payload.get("provenance") or {}}
        write_json(sidecar, info)
    except DiskFull:
        out.unlink(missing_ok=True)
        raise
    except OSError as err:
        raise ConfigError(f"cannot write {out} ({err.strerror or err}); pass out=PATH somewhere writable") from None
    size = out.stat().st_size
    console.print(f"exported {payload['name']} ({payload['role']}) as {cfg.format}: {out} ({size / 2**20:.2f} MiB); "
                  f"checked on {check['images']} test images of {dataset.name}: max abs logit difference "
                  f"{check['max_abs_diff']:.2g} (atol {cfg.atol}, rtol {cfg.rtol}); it takes {preprocessing_line(info)}; "
                  f"sidecar {sidecar}")
    return {**info, "path": str(out), "bytes": size, "sidecar": str(sidecar)}


def preprocessing_line(info: dict) -> str:
    """The input the exported model takes, in a few words."""
    shape = "x".join(map(str, info["input"]["shape"][1:]))
    prep = info["input"]["preprocessing"]
    return f"float32 NCHW batches of {shape} images, " + "; ".join(str(v) for k, v in prep.items() if v and k != "from")
