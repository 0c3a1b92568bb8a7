"""The `fitnets` entry point: `fitnets COMMAND [hydra overrides...]`."""

import os
import sys

import hydra
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from fitnets_cli.config import ConfigError, to_config
from fitnets_cli.ui import errors

# command -> (primary config in conf/, what it does)
COMMANDS = {
    "train-teacher": ("train_teacher", "train a teacher by backprop and store it for `train`"),
    "train": ("train", "train a student: hints (stage 1) then KD (stage 2), or another schedule"),
    "eval": ("eval", "test accuracy and loss of a saved model: checkpoint=PATH"),
    "compare": ("compare", "params, multiplications and accuracy of students against their teacher"),
}

USAGE = """usage: fitnets COMMAND [OVERRIDES...] [--help] [--cfg job] [-m]

commands:
{commands}

Overrides are Hydra's: `fitnets train student=fitnet1 dataset=cifar10 seed=1`, `-m` sweeps
(`fitnets train -m student=fitnet1,fitnet2 seed=0,1,2`), `fitnets COMMAND --help` lists config groups.
Set FITNETS_DEBUG=1 to see full tracebacks."""


def _task(command: str):
    def task(cfg: DictConfig):
        from fitnets_cli import compare, evaluate, train   # torch loads here, after Hydra parsed the args

        run = {"train-teacher": train.train_teacher, "train": train.train_student,
               "eval": evaluate.eval_command, "compare": compare.compare_command}[command]
        try:
            return run(to_config(cfg))
        except (ConfigError, OmegaConfBaseException) as err:
            if os.environ.get("FITNETS_DEBUG"):
                raise
            errors.print(f"[bold red]error:[/] {err}".splitlines()[0])
            sys.exit(2)

    return task


def main() -> None:
    """Dispatch `fitnets COMMAND ...` to the Hydra app of that command."""
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help", "help"):
        width = max(map(len, COMMANDS))
        print(USAGE.format(commands="\n".join(f"  {c:<{width}}  {d}" for c, (_, d) in COMMANDS.items())))
        return
    command = args[0]
    if command not in COMMANDS:
        print(f"fitnets: unknown command {command!r}; commands are {', '.join(COMMANDS)} (see fitnets --help)",
              file=sys.stderr)
        sys.exit(2)
    sys.argv = [f"fitnets {command}", *args[1:]]
    app = hydra.main(config_path="pkg://fitnets_cli.conf", config_name=COMMANDS[command][0], version_base="1.3")
    app(_task(command))()


if __name__ == "__main__":
    main()
