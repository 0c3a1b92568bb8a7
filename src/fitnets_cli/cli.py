"""The `fitnets` entry point: `fitnets COMMAND [hydra overrides...]`."""

import os
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException
from rich.markup import escape

from fitnets_cli import api
from fitnets_cli.config.commands import CONFIGS, explained
from fitnets_cli.config.errors import ConfigError, one_line
from fitnets_cli.runtime.ui import console, errors

# command -> (what it does, the function of fitnets_cli.api that runs it)
COMMANDS = {
    "train-teacher": ("train a teacher by backprop and store it for `train`", "train_teacher"),
    "train": ("train a student: hints (stage 1) then KD (stage 2), or another schedule", "train"),
    "eval": ("test accuracy and loss of a saved model: checkpoint=PATH", "evaluate"),
    "compare": ("params, multiplications and accuracy of students against their teacher", "compare"),
    "layers": ("each network's tap points and shapes, the default hint pair and the hint plan", "layers"),
    "export": ("a saved model as safetensors, TorchScript, ONNX or pt2, checked against it", "export"),
}

USAGE = """usage: fitnets COMMAND [OVERRIDES...] [--help] [--cfg job] [-m]

commands:
{commands}

Overrides are Hydra's: `fitnets train student=fitnet1 dataset=cifar10 seed=1`, `-m` sweeps
(`fitnets train -m student=fitnet1,fitnet2 seed=0,1,2`), `fitnets COMMAND --help` lists config groups.
Set FITNETS_DEBUG=1 to see full tracebacks."""

# Hydra's flags that take a value (`--cfg job`), and those that print the config or help without running.
VALUED = ("--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd",
          "--experimental-rerun")
PRINTING = ("--cfg", "-c", "--help", "-h", "--hydra-help")

# What the command line's check made for the one job of a single run, which that job then runs with (the
# typed config and, for the training commands, its networks), so that nothing is checked or built twice.
PREPARED = {}


def debugging(args) -> bool:
    return bool(os.environ.get("FITNETS_DEBUG")) or any(a.startswith("hydra.verbose=") for a in args)


def split(args: list[str]) -> tuple[list[str], list[str]]:
    """(Hydra's flags with their values, the overrides), each in the order given."""
    flags, overrides, value = [], [], False
    for a in args:
        if value or a.startswith("-"):
            flags.append(a)
            value = not value and a in VALUED
        else:
            overrides.append(a)
    return flags, overrides


def first_job(command: str, overrides: list[str], multirun: bool) -> list[str]:
    """The first job's overrides, a sweep taking its first value. A sweep without -m, or over Hydra's own
    settings, stops in one line naming the form that works."""
    first = []
    for o in OverridesParser.create().parse_overrides(overrides):
        if not o.is_sweep_override():
            first.append(o.input_line)
            continue
        key = o.get_key_element()
        if key.startswith("hydra.sweeper.params."):
            fail(f"{o.input_line}: Hydra sweeps no hydra.* key from the command line; give the Optuna sweeper the "
                 f"search space as a plain override: -m hydra/sweeper=optuna "
                 f"'{o.input_line.removeprefix('hydra.sweeper.params.')}' (docs/export.md#optuna)")
        if key.startswith("hydra.") or key.startswith("hydra/"):
            fail(f"{o.input_line}: Hydra cannot sweep over its own settings; give {key} one value and sweep the "
                 f"run's keys (fitnets {command} -m seed=0,1,2)")
        if not multirun:
            fail(f"{o.input_line} is a sweep: add -m (fitnets {command} -m {o.input_line}), or give {key} one value")
        try:
            first.append(f"{key}={next(iter(o.sweep_string_iterator()))}")
        except Exception:   # glob() and Optuna's interval()/choice() need the sweeper: checked when the jobs run
            continue
    return first


def precheck(command: str, args: list[str]) -> list[str]:
    """Compose and check the (first) job's config before Hydra runs or creates anything, so that bad input stops
    with one line and writes nothing; for a single run, keep the typed config and its networks in PREPARED for
    its job. Returns the arguments for Hydra, with the output directory (checked here) pinned."""
    if "--info" in args or "-i" in args:
        return args   # Hydra's own report of its search path and plugins
    multirun = any(a in ("-m", "--multirun") for a in args)
    flags, overrides = split(args)
    if multirun and any(a in ("--cfg", "-c") for a in flags):
        fail("-m and --cfg do not go together (Hydra prints one config); drop -m to see the first job's config")
    # Hydra's parser takes its flags before the overrides only: `fitnets train seed=1 -m lr=...` works too.
    args = flags + overrides
    try:
        cfg = api.composed(command, first_job(command, overrides, multirun), hydra=True)
        out = Path(cfg.hydra.sweep.dir if multirun else cfg.hydra.run.dir)
        if any(a in PRINTING for a in args):
            api.typed(cfg, files=False)   # the config's own checks; its image files are not read
            return args   # Hydra prints the config or the help; nothing runs
        config = api.typed(cfg)
        built = api.networks(config) if command in ("train", "train-teacher") and not config.resume else None
    except Exception as err:
        if debugging(args):
            raise
        fail(explained(err, command))
    if not multirun:
        PREPARED.update(config=config, built=built)
    if getattr(config, "resume", None):
        if not (Path(config.resume) / "config_resolved.yaml").is_file():
            fail(f"resume={config.resume} is not a fitnets run directory (no config_resolved.yaml); pass the "
                 "directory of the run to continue")
        # The run continues in its own directory; Hydra must not write a new .hydra/ over the original.
        return args + [f"hydra.run.dir={config.resume}", "hydra.output_subdir=null"]
    claim(out, multirun)
    return args + [f"hydra.{'sweep' if multirun else 'run'}.dir={out}"]


def claim(out: Path, multirun: bool) -> None:
    """Stop in one line unless `out` can take a new run: writable, and (for a single run) holding no other run."""
    from fitnets_cli.training.rundir import holds

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


def distributed(command: str, args: list[str]) -> list[str]:
    """Under torchrun: join the process group; rank 0 checks the arguments and picks the run directory, and
    every rank gets the same ones, so all ranks share one run directory (Hydra would otherwise resolve
    ${now:...} in each process) and only rank 0 lets Hydra write its .hydra/ files."""
    from fitnets_cli.runtime import dist   # torch loads here: torchrun runs training

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


def fail(message: str) -> None:
    errors.print(f"[bold red]error:[/] {escape(message)}")   # messages quote overrides such as [a,b]
    sys.exit(2)


def task(cfg: DictConfig):
    """One Hydra job: run the command its config names through fitnets_cli.api, and return, for the training
    commands, the run's objective (what an Optuna sweep minimises). (Module-level, so that launchers that run
    jobs in other processes, such as joblib, can pickle it.)"""
    from fitnets_cli.training.resume import STOP, Interrupted
    from fitnets_cli.training.rundir import AlreadyFinished

    try:
        single = HydraConfig.get().mode == RunMode.RUN and PREPARED
        config = PREPARED.pop("config") if single else api.typed(cfg)
        built = PREPARED.pop("built") if single else None
        # Training commands run in Hydra's output directory, which precheck chose and checked.
        where = {"run_dir": HydraConfig.get().runtime.output_dir, "built": built} \
            if cfg.command in ("train", "train-teacher") else {}
        result = getattr(api, COMMANDS[cfg.command][1])(config, **where)
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
        print(USAGE.format(commands="\n".join(f"  {c:<{width}}  {d}" for c, (d, _) in COMMANDS.items())))
        return
    command = args[0]
    if command not in COMMANDS:
        print(f"fitnets: unknown command {command!r}; commands are {', '.join(COMMANDS)} (see fitnets --help)",
              file=sys.stderr)
        sys.exit(2)
    torchrun = os.environ.get("WORLD_SIZE", "1") != "1"
    args = distributed(command, args[1:]) if torchrun else precheck(command, args[1:])
    sys.argv = [f"fitnets {command}", *args]
    app = hydra.main(config_path="pkg://fitnets_cli.conf", config_name=CONFIGS[command], version_base="1.3")
    app(task)()


if __name__ == "__main__":
    main()
