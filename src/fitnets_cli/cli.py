"""The `fitnets` entry point: `fitnets COMMAND [hydra overrides...]`."""

import os
import re
import signal
import sys
from pathlib import Path

import hydra
from hydra import compose, initialize_config_module
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import DictConfig, open_dict
from omegaconf.errors import OmegaConfBaseException
from rich.markup import escape

from fitnets_cli.commands import elsewhere, to_config
from fitnets_cli.config import ConfigError
from fitnets_cli.ui import console, errors

# command -> (primary config in conf/, what it does, the function of fitnets_cli.api that runs it)
COMMANDS = {
    "train-teacher": ("train_teacher", "train a teacher by backprop and store it for `train`", "train_teacher"),
    "train": ("train", "train a student: hints (stage 1) then KD (stage 2), or another schedule", "train"),
    "eval": ("eval", "test accuracy and loss of a saved model: checkpoint=PATH", "evaluate"),
    "compare": ("compare", "params, multiplications and accuracy of students against their teacher", "compare"),
    "layers": ("layers", "each network's tap points and shapes, the default hint pair and the hint plan", "layers"),
    "export": ("export", "a saved model as safetensors, TorchScript, ONNX or pt2, checked against it", "export"),
}

USAGE = """usage: fitnets COMMAND [OVERRIDES...] [--help] [--cfg job] [-m]

commands:
{commands}

Overrides are Hydra's: `fitnets train student=fitnet1 dataset=cifar10 seed=1`, `-m` sweeps
(`fitnets train -m student=fitnet1,fitnet2 seed=0,1,2`), `fitnets COMMAND --help` lists config groups.
Set FITNETS_DEBUG=1 to see full tracebacks."""


def one_line(err: Exception) -> str:
    """Hydra's and OmegaConf's multi-line messages folded into one line, without the debugging noise."""
    parts, options = [], []
    chain = [err]
    while chain[-1].__cause__ is not None:
        chain.append(chain[-1].__cause__)
    for line in "\n".join(str(e) for e in chain).splitlines():
        line = line.strip()
        if line.startswith(("reference_type", "object_type", "To append", "Config search path", "provider=",
                            "Set the environment", "full_key:")) or not line:
            continue
        if line.startswith("Available options in"):
            parts.append(line.rstrip(":") + ":")
        elif parts and parts[-1].endswith(":") and line.isidentifier():
            options.append(line)
        else:
            parts.append(line)
    text = " ".join(parts)
    return text + (" " + ", ".join(options) if options else "")


def explained(err: Exception, command: str) -> str:
    """A composition error in one line, with the fix where fitnets knows it (the command that owns a key, the
    zoo form of a benchmark network, the extra that brings Hydra's launchers)."""
    line = one_line(err)
    hint = ("; Hydra's launcher plugins come with `pip install '.[cluster]'`, run in the root of the fitnets clone"
            if "hydra/launcher" in line else "; the Optuna sweeper comes with `pip install '.[optuna]'`, run in the "
            "root of the fitnets clone" if "hydra/sweeper" in line else "")
    if "Interpolation key 'variants." in line:
        hint = ("; teacher=maxout has variants for dataset.family mnist, cifar and svhn only: set "
                "dataset.family to one of them, or use teacher=torchvision or teacher=module")
    refused = re.search(r"Could not override '(\w+)[.'].*(?:not in '\w+Config'|No match in the defaults list)", line)
    if refused:
        hint = elsewhere(refused[1], command)
    missing = re.search(r"Could not find '(teacher|student)/(\w+)'", line)
    if missing:
        from fitnets_cli.zoo import NETWORKS   # torch loads here, on this error only
        if missing[2] in NETWORKS:
            hint = (f"; the CIFAR-100 benchmark's networks are {missing[1]}=zoo {missing[1]}.arch={missing[2]}"
                    f" (or pair=TEACHER-STUDENT)")
    return line.rstrip(".") + hint if hint else line


def debugging(args) -> bool:
    return bool(os.environ.get("FITNETS_DEBUG")) or any(a.startswith("hydra.verbose=") for a in args)


def precheck(command: str, args: list[str]) -> list[str]:
    """Compose the (first) job's config before Hydra runs or creates anything, so that bad input stops with
    one line and writes nothing, and a finished run or an unwritable output directory is refused.
    Returns the arguments for Hydra, with the output directory checked here pinned."""
    if any(a.startswith("-") and a not in ("-m", "--multirun") for a in args):
        return args   # --help, --cfg, --info ...: Hydra's own
    multirun = any(a in ("-m", "--multirun") for a in args)
    try:
        overrides = []
        for o in OverridesParser.create().parse_overrides([a for a in args if not a.startswith("-")]):
            if o.is_sweep_override():
                try:
                    overrides.append(f"{o.get_key_element()}={next(iter(o.sweep_string_iterator()))}")
                except Exception:   # glob() sweeps need Hydra's config loader: checked when the jobs run
                    continue
            else:
                overrides.append(o.input_line)
        with initialize_config_module("fitnets_cli.conf", version_base="1.3"):
            cfg = compose(COMMANDS[command][0], overrides=overrides, return_hydra_config=True)
        out = Path(cfg.hydra.sweep.dir if multirun else cfg.hydra.run.dir)
        with open_dict(cfg):
            del cfg["hydra"]
        config = with_data(to_config(cfg))
        if command == "train" and not config.resume and {"hint", "joint"} & set(config.schedule.stages):
            from fitnets_cli.hints import plan_from_configs   # torch loads here: the pairs are checked first
            plan_from_configs(config)
    except Exception as err:
        if debugging(args):
            raise
        errors.print(f"[bold red]error:[/] {escape(explained(err, command))}")
        sys.exit(2)
    if getattr(config, "resume", None):
        if not (Path(config.resume) / "config_resolved.yaml").is_file():
            fail(f"resume={config.resume} is not a fitnets run directory (no config_resolved.yaml); pass the "
                 "directory of the run to continue")
        # The run continues in its own directory; Hydra must not write a new .hydra/ over the original.
        return args + [f"hydra.run.dir={config.resume}", "hydra.output_subdir=null"]
    from fitnets_cli.checkpoint import holds   # torch loads here, only once the arguments are known to be good
    if not multirun and holds(out):
        fail(f"{out} holds {holds(out)}; pass another hydra.run.dir (or resume={out})")
    try:
        out.mkdir(parents=True, exist_ok=True)
        probe = out / ".fitnets-write-test"
        probe.touch()
        probe.unlink()
    except OSError as err:
        fail(f"cannot write the output directory {out} ({err.strerror}); pass hydra.run.dir=DIR "
             "(hydra.sweep.dir=DIR with -m) somewhere writable")
    return args + [f"hydra.{'sweep' if multirun else 'run'}.dir={out}"]


def distributed(command: str, args: list[str]) -> list[str]:
    """Under torchrun: join the process group; rank 0 checks the arguments and picks the run directory, and
    every rank gets the same ones, so all ranks share one run directory (Hydra would otherwise resolve
    ${now:...} in each process) and only rank 0 lets Hydra write its .hydra/ files."""
    from fitnets_cli import dist   # torch loads here: torchrun runs training

    if not dist.is_main():
        console.quiet = errors.quiet = True
    if any(a in ("-m", "--multirun") for a in args):
        fail("-m (multirun) cannot run under torchrun, whose processes train one run together; launch one "
             "torchrun per run, or sweep with hydra/launcher=joblib or submitit_slurm (see docs/scaling.md)")
    if command == "compare":
        fail("compare runs in one process; start it with `fitnets compare ...`, not torchrun")
    dist.init()
    checked = None
    if dist.is_main():
        try:
            checked = precheck(command, args)
        except SystemExit as stop:
            dist.share(stop.code)
            raise
    checked = dist.share(checked)
    if not isinstance(checked, list):   # rank 0 stopped on bad input and said why
        sys.exit(checked)
    if not dist.is_main() and "hydra.output_subdir=null" not in checked:
        checked = checked + ["hydra.output_subdir=null"]
    return checked


def with_data(config):
    """The config with an image-file dataset's shape and classes read from its files, which are checked on the
    way (before anything is written); other configs as they are."""
    if getattr(config, "dataset", None) is None or config.dataset.images is None or getattr(config, "resume", None):
        return config
    from fitnets_cli.images import resolve   # torch and PIL load here: only image files need them

    return resolve(config)


def fail(message: str) -> None:
    errors.print(f"[bold red]error:[/] {escape(message)}")   # messages quote overrides such as [a,b]
    sys.exit(2)


def task(cfg: DictConfig):
    """One Hydra job: run the command its config names through fitnets_cli.api, and return, for the training
    commands, the run's objective (what an Optuna sweep minimises). (Module-level, so that launchers that run
    jobs in other processes, such as joblib, can pickle it.)"""
    from fitnets_cli import api   # torch loads with it, after Hydra parsed the args
    from fitnets_cli.resume import STOP, Interrupted
    from fitnets_cli.rundir import AlreadyFinished

    try:
        config = with_data(to_config(cfg))
        # Training commands run in Hydra's output directory, which precheck chose and checked.
        where = {"run_dir": HydraConfig.get().runtime.output_dir} if cfg.command in ("train", "train-teacher") else {}
        result = getattr(api, COMMANDS[cfg.command][2])(config, **where)
    except AlreadyFinished as done:
        console.print(str(done))
        return None
    except Interrupted as stopped:
        errors.print(f"stopped by {escape(str(stopped))}")
        sys.exit(128 + (STOP or [signal.SIGTERM])[0])   # empty: another torchrun rank was signalled
    except KeyboardInterrupt:
        fail("interrupted before training started; nothing was trained")
    except (ConfigError, OmegaConfBaseException) as err:
        if debugging(sys.argv):
            raise
        if not optuna_sweep():
            fail(one_line(err))
        # A failed trial must not end the sweep: Optuna gets the worst value (hydra-optuna-sweeper 1.2 stops the
        # study on a NaN or an exception), and the trial's line says why.
        errors.print(f"[bold red]error:[/] {escape(one_line(err))}; this trial counts as the worst value")
        return float("-inf") if HydraConfig.get().sweeper.get("direction") == "maximize" else float("inf")
    return api.objective(result, config.objective) if cfg.command in ("train", "train-teacher") else result


def optuna_sweep() -> bool:
    """Whether this job is a trial of hydra-optuna-sweeper."""
    return HydraConfig.initialized() and "optuna" in str(HydraConfig.get().sweeper.get("_target_", ""))


def main() -> None:
    """Dispatch `fitnets COMMAND ...` to the Hydra app of that command."""
    args = sys.argv[1:]
    if not args or args[0] in ("-h", "--help", "help"):
        width = max(map(len, COMMANDS))
        print(USAGE.format(commands="\n".join(f"  {c:<{width}}  {d}" for c, (_, d, _) in COMMANDS.items())))
        return
    command = args[0]
    if command not in COMMANDS:
        print(f"fitnets: unknown command {command!r}; commands are {', '.join(COMMANDS)} (see fitnets --help)",
              file=sys.stderr)
        sys.exit(2)
    torchrun = os.environ.get("WORLD_SIZE", "1") != "1"
    args = distributed(command, args[1:]) if torchrun else precheck(command, args[1:])
    sys.argv = [f"fitnets {command}", *args]
    app = hydra.main(config_path="pkg://fitnets_cli.conf", config_name=COMMANDS[command][0], version_base="1.3")
    app(task)()


if __name__ == "__main__":
    main()
