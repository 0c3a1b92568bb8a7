"""`fitnets eval`: test accuracy and loss of any saved teacher or student."""

from rich.table import Table

from fitnets_cli.config.commands import EvalConfig
from fitnets_cli.config.errors import ConfigError
from fitnets_cli.data.load import load_data
from fitnets_cli.networks.checkpoint import load_model, saved_dataset
from fitnets_cli.runtime import dist
from fitnets_cli.runtime.ui import console
from fitnets_cli.training.evaluate import evaluate


def eval_command(cfg: EvalConfig) -> dict:
    """Evaluate checkpoint=PATH on the test set of its dataset (or of dataset=NAME)."""
    if not cfg.checkpoint:
        raise ConfigError("eval needs checkpoint=PATH (a run's checkpoints/student.pt or teacher.pt)")
    device = dist.pick_device(cfg.device)
    net, payload = load_model(cfg.checkpoint, device)
    dataset = cfg.dataset or saved_dataset(payload)
    if tuple(dataset.in_shape) != net.in_shape or dataset.num_classes != net.num_classes:
        raise ConfigError(f"checkpoint {cfg.checkpoint} takes {net.in_shape} inputs and {net.num_classes} "
                          f"classes; dataset={dataset.name} has {tuple(dataset.in_shape)} and {dataset.num_classes}")
    data = load_data(dataset, cfg.data, device)
    metrics = evaluate(net, data.test, cfg.eval_batch_size)
    table = Table(title=f"eval {cfg.checkpoint}")
    for col in ("model", "role", "trained on", "tested on", "test acc", "test error", "test loss"):
        table.add_column(col)
    table.add_row(payload["name"], payload["role"], payload["dataset"]["name"], dataset.name,
                  f"{metrics['acc']:.2%}", f"{metrics['error']:.2%}", f"{metrics['loss']:.4f}")
    console.print(table)
    made = payload.get("provenance") or {}
    if made:
        versions = ", ".join(f"{k} {v}" for k, v in made["versions"].items())
        console.print(f"provenance: {versions}; git commit {made['git_commit'] or 'unknown'}; teacher sha256 "
                      f"{made['teacher_sha256'] or '-'}; split seed {made['split_seed']}; seed {made['seed']}")
        console.print(f"config:\n{payload['config']}")
    return metrics
