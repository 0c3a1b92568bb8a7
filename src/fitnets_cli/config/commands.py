"""One config schema per command (SCHEMAS), on the group schemas of groups.py: a key of another command, or
of none, fails at composition with a message naming the command that owns it."""

import re
from dataclasses import dataclass, field, fields, replace
from typing import Any, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from fitnets_cli.config.errors import ConfigError, one_line, one_of, require
from fitnets_cli.config.groups import Data, Dataset, Hints, Recipe, Schedule, Speed, Student, Teacher


DEVICES = ("auto", "cpu", "cuda")   # auto: the GPU when there is one


@dataclass
class Common:
    """The keys of every command (conf/common.yaml)."""
    command: str = MISSING
    data: Data = field(default_factory=Data)

    def __post_init__(self):
        if hasattr(self, "device"):   # the commands that run networks on a device (not layers, not export)
            one_of(self.device, DEVICES, "device")


@dataclass
class TrainingConfig(Common):
    """The keys of both training commands (conf/training.yaml), which are all of `fitnets train-teacher`'s
    (conf/train_teacher.yaml); `fitnets train` adds the student's."""
    device: str = "auto"
    dataset: Dataset = MISSING
    teacher: Teacher = MISSING
    recipe: Recipe = MISSING
    seed: int = 0
    deterministic: bool = False         # torch.use_deterministic_algorithms: bit-identical reruns
    resume: Optional[str] = None        # continue the run in this directory
    teacher_store: str = "teachers"     # train-teacher saves here; train looks here
    amp: bool = False                   # bf16 autocast (CUDA or CPU)
    compile: bool = False               # torch.compile each layer (see docs/performance.md for when it pays)
    channels_last: bool = False         # networks in channels_last memory format (docs/performance.md)
    # actual: every parameter of the built network. paper: weights only, FC maxout as 2 pieces (spec 2.8).
    counting: str = "actual"
    eval_batch_size: int = 1000
    # What the run returns to a sweeper (Optuna minimises it): valid_error, the last stage's best validation
    # error, or a figure of metrics.json by dotted path (test.error, test_last.loss, stages.0.best_valid).
    objective: str = "valid_error"

    def __post_init__(self):
        super().__post_init__()
        one_of(self.counting, ("actual", "paper"), "counting")
        require(self.eval_batch_size > 0, "eval_batch_size must be > 0")
        require(self.objective == "valid_error" or self.objective.split(".")[0] in ("test", "test_last", "stages",
                                                                                    "retrain", "wall_s"),
                f"objective={self.objective} is not a figure of metrics.json; use valid_error or a dotted path "
                "such as test.error, test_last.loss or stages.0.best_valid")


@dataclass
class TrainConfig(TrainingConfig):
    """`fitnets train` (conf/train.yaml): what train-teacher takes (it may train the teacher first), and the
    student, its hints and its schedule."""
    student: Student = MISSING
    hints: Hints = MISSING
    schedule: Schedule = MISSING
    # Where the teacher's inputs are deterministic (no augmentation), compute its outputs once per stage.
    teacher_cache: bool = True
    teacher_cache_gb: float = 2.0       # ... when they fit in this much memory


@dataclass
class EvalConfig(Common):
    """`fitnets eval` (conf/eval.yaml)."""
    checkpoint: Optional[str] = None    # the model to evaluate
    device: str = "auto"
    dataset: Optional[Dataset] = None   # None: the dataset it was trained on
    eval_batch_size: int = 1000

    def __post_init__(self):
        super().__post_init__()
        require(self.eval_batch_size > 0, "eval_batch_size must be > 0")


@dataclass
class CompareConfig(Common):
    """`fitnets compare` (conf/compare.yaml)."""
    device: str = "auto"                # where latencies are measured
    dataset: Dataset = MISSING
    teacher: Teacher = MISSING
    students: List[str] = field(default_factory=list)   # student configs; [] with no runs: dataset.students
    runs: Any = field(default_factory=list)             # run directories, globs or sweep directories
    format: str = "table"                               # table | md | csv | json
    metric: str = "accuracy"                            # accuracy | error: what the table shows
    layout: str = "rows"                                # rows | benchmark (a column per teacher/student pair)
    out: Optional[str] = None                           # write md/csv/json here instead of stdout
    plots: Optional[str] = None                         # write PNG plots into this directory
    speed: Speed = field(default_factory=Speed)
    counting: str = "actual"

    def __post_init__(self):
        super().__post_init__()
        if isinstance(self.runs, str):
            self.runs = [self.runs]
        one_of(self.format, ("table", "md", "csv", "json"), "format")
        one_of(self.metric, ("accuracy", "error"), "metric")
        one_of(self.layout, ("rows", "benchmark"), "layout")
        one_of(self.counting, ("actual", "paper"), "counting")


@dataclass
class ExportConfig(Common):
    """`fitnets export` (conf/export.yaml)."""
    checkpoint: Optional[str] = None    # the model to export
    format: str = "safetensors"         # safetensors | torchscript | onnx | pt2
    out: Optional[str] = None           # None: beside the checkpoint
    check_images: int = 256             # test images whose logits the export must reproduce ...
    rtol: float = 1e-4                  # ... within these tolerances
    atol: float = 1e-5

    def __post_init__(self):
        super().__post_init__()
        one_of(self.format, ("safetensors", "torchscript", "onnx", "pt2"), "format")
        require(self.check_images > 0 and self.rtol >= 0 and self.atol >= 0,
                "check_images must be > 0, rtol and atol >= 0")


@dataclass
class LayersConfig(Common):
    """`fitnets layers` (conf/layers.yaml)."""
    dataset: Dataset = MISSING
    teacher: Teacher = MISSING
    student: Student = MISSING
    hints: Hints = MISSING
    schedule: Schedule = MISSING
    recipe: Recipe = MISSING            # (the kd term's tau and lam)


# command -> its primary config in conf/
CONFIGS = {"train": "train", "train-teacher": "train_teacher", "eval": "eval", "compare": "compare", "layers": "layers",
           "export": "export"}
SCHEMAS = {"train": TrainConfig, "train-teacher": TrainingConfig, "eval": EvalConfig, "compare": CompareConfig,
           "layers": LayersConfig, "export": ExportConfig}
for schema in SCHEMAS.values():   # each primary config in conf/ lists its schema first, by class name
    ConfigStore.instance().store(name=schema.__name__, node=schema)


def owners(key: str) -> list[str]:
    """The commands whose config has the top-level `key` (or config group)."""
    return [command for command, schema in SCHEMAS.items() if key in {f.name for f in fields(schema)}]


def elsewhere(key: str, command: str) -> str:
    """What to say of a top-level key that `command` refuses: the commands it belongs to, if any."""
    others = [f"`fitnets {c}`" for c in owners(key) if c != command]
    return (f"; {key} belongs to {' and '.join(others)}, not to `fitnets {command}`: drop it, or run that command"
            if others else "")


def to_config(cfg: DictConfig) -> Common:
    """Resolve the composed config into typed dataclasses, running their value checks. Keys that Hydra's
    `+teacher.KEY=VALUE` added to a network become its keyword arguments (Hydra's _target_ convention)."""
    for role, schema in (("teacher", Teacher), ("student", Student)):
        known = {f.name for f in fields(schema)}
        if cfg.get(role) is not None and set(cfg[role]) - known:
            node = OmegaConf.to_container(cfg[role], resolve=True)
            node["kwargs"].update({k: node.pop(k) for k in set(node) - known})
            cfg[role] = OmegaConf.merge(OmegaConf.structured(schema), node)
    # Hydra lets `+key=value` add a key to the root of a structured config: refuse what the schema lacks.
    unknown = sorted(set(cfg) - {f.name for f in fields(SCHEMAS[cfg.command])})
    if unknown:
        raise ConfigError(f"`fitnets {cfg.command}` has no key {unknown[0]}" + (elsewhere(unknown[0], cfg.command)
                          or f"; see its keys with `fitnets {cfg.command} --cfg job`"))
    return network_lrs(OmegaConf.to_object(cfg))


def network_lrs(cfg: Common) -> Common:
    """The config with the LR that recipe.lr_by_network gives the teacher or the student it names (applied at
    composition, so that a run's saved config shows what trained)."""
    if getattr(cfg, "recipe", None) is None:
        return cfg
    lrs = cfg.recipe.lr_by_network
    for role in ("teacher", "student"):
        net = getattr(cfg, role, None)   # train-teacher has no student
        if net is not None and net.name in lrs:
            optim = replace(getattr(cfg.recipe, role), lr=lrs[net.name])
            cfg = replace(cfg, recipe=replace(cfg.recipe, **{role: optim}))
    return cfg


def explained(err: Exception, command: str) -> str:
    """A composition error in one line, with the fix where fitnets knows it (the command that owns a key, the
    extra that brings Hydra's launchers or the Optuna sweeper, the datasets that teacher=maxout has)."""
    line = one_line(err)
    hint = ("; Hydra's launcher plugins come with `pip install '.[cluster]'`, run in the root of the fitnets clone"
            if "hydra/launcher" in line else "; the Optuna sweeper comes with `pip install '.[optuna]'`, run in the "
            "root of the fitnets clone" if "hydra/sweeper" in line else "")
    if "Interpolation key 'variants." in line:
        hint = ("; teacher=maxout has variants for dataset.family mnist, cifar and svhn only: set "
                "dataset.family to one of them, or use teacher=torchvision or teacher=module")
    past = re.search(r"Error merging override (\S+?)=.*Invalid type assigned: dict is not a subclass of (\w+)", line)
    if past:   # an index past the end of a list of schemas: OmegaConf would append an empty entry
        hint = (f"; {past[1]} names a {past[2]} that the composed list does not have (the overrides apply before a "
                "sweep's choices: give the group as a plain override, e.g. schedule=dkd, or the whole list)")
    refused = re.search(r"Could not override '(\w+)[.'].*(?:not in '\w+Config'|No match in the defaults list)", line)
    if refused:
        hint = elsewhere(refused[1], command)
    return line.rstrip(".") + hint if hint else line
