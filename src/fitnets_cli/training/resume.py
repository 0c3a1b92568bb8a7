"""How a run survives: its progress, saved to <run>/checkpoints/last.pt after every epoch, at every stage
boundary and, on SIGINT or SIGTERM, after the current step; and a full disk that leaves the last one intact."""

import math
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch

from fitnets_cli.config.errors import ConfigError
from fitnets_cli.runtime import dist
from fitnets_cli.runtime.files import DiskFull, atomic_write
from fitnets_cli.training.stages import Session

FORMAT = "fitnets-resume-4"   # 4: the terms' own modules; 3: one Progress record; 2: best weights per module


def fresh_best() -> dict:
    return {"score": math.inf, "epoch": -1, "state": None}


@dataclass
class Progress:
    """Where a run is: everything resuming needs besides the weights and the RNG. The fields after `stages_started`
    describe the stage in progress (stage number len(results)); `optimizer` is set only inside one."""
    phase: int = 0                  # 0: the stages with validation; 1: retraining on train + valid
    validated: list = field(default_factory=list)   # phase 0's stage results, once phase 1 runs
    results: list = field(default_factory=list)     # this phase's finished stages
    step: int = 0                   # epochs run over all stages and phases: the TensorBoard x axis
    stages_started: int = 0
    epoch: int = 0
    batch: int = 0                  # the first batch of the epoch still to run
    order: torch.Tensor | None = None   # the epoch's image order; None: drawn when the epoch starts
    seed: int = 0                   # the seed of the epoch's random-resized crops
    sums: dict = field(default_factory=dict)        # the epoch's running sums of the loss terms ...
    correct: torch.Tensor | float = 0.0             # ... and of correct predictions, on the device
    history: list = field(default_factory=list)     # the stage's epoch records
    best: dict = field(default_factory=fresh_best)  # its best validation score, epoch and weights
    optimizer: dict | None = None   # the stage's optimiser state, when the run stopped inside a stage

    def next_epoch(self, device) -> None:
        """Move on to the next epoch of the stage: its position and running sums start again."""
        self.epoch, self.batch, self.order, self.seed = self.epoch + 1, 0, None, 0
        self.sums, self.correct = {}, torch.zeros((), device=device)

    def start_stage(self, device) -> None:
        """Start a stage from its first epoch, with no history."""
        self.next_epoch(device)
        self.epoch, self.history, self.best, self.optimizer = 0, [], fresh_best(), None


def save(run, s: Session, progress: Progress, mid_epoch: bool = False) -> None:
    """Write last.pt: progress, weights, the stage's optimiser state, RNG states. Mid-epoch, the running sums
    are summed over ranks first (rank 0 carries them on after a resume). Runs without a directory (tests,
    the benchmark) keep none."""
    if run.dir is None:
        return
    sums, correct = progress.sums, progress.correct
    if mid_epoch:   # the run stops after this: summing in place is harmless
        sums = {k: dist.sum_(v) for k, v in sums.items()}
        correct = dist.sum_(correct) if torch.is_tensor(correct) else correct
    saved = replace(progress, sums=sums, correct=correct,
                    optimizer=s.optimizer.state_dict() if s.optimizer is not None else None)
    state = {"format": FORMAT, "progress": {f.name: getattr(saved, f.name) for f in fields(saved)},
             "student": s.net.state_dict(),   # (the trained network's key, whichever role it has)
             "regressors": s.regressors.state_dict(), "terms": s.terms.state_dict(), "rng": torch.get_rng_state(),
             "cuda_rng": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    atomic_write(run.dir / "checkpoints" / "last.pt", lambda tmp: torch.save(state, tmp))
    run.tb.flush()   # the logged epochs survive a SIGKILL along with the checkpoint


def load(run_dir: Path) -> dict | None:
    """The saved state of a run directory (see `save`), or None if it has none."""
    path = run_dir / "checkpoints" / "last.pt"
    if not path.exists():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ConfigError(f"the resume checkpoint {path} is corrupted ({str(err).splitlines()[0][:100]}); "
                          "it cannot be resumed") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise ConfigError(f"{path} is not a resume checkpoint of this fitnets version ({FORMAT}); "
                          "finish it with the version that started it")
    return state


def restore(s: Session, state: dict) -> Progress:
    """Put a freshly built session's weights and the RNG back where `state` was saved; return its progress."""
    s.net.load_state_dict(state["student"])
    s.regressors.load_state_dict(state["regressors"])
    s.terms.load_state_dict(state["terms"])
    torch.set_rng_state(state["rng"])
    if state["cuda_rng"]:
        torch.cuda.set_rng_state_all(state["cuda_rng"])
    progress = Progress(**state["progress"])
    device = s.device
    keep = dist.is_main()   # the saved sums are over all ranks: rank 0 carries them on, the others restart
    progress.order = None if progress.order is None else progress.order.to(device)
    progress.sums = {k: v.to(device) * keep for k, v in progress.sums.items()}
    progress.correct = torch.as_tensor(progress.correct, device=device) * keep
    return progress


class Interrupted(Exception):
    """SIGINT or SIGTERM stopped training after a step; its checkpoint is written."""


STOP = []   # the signals received; checked after every training step


@contextmanager
def stop_on_signals(resume_command: str):
    """While training, SIGINT and SIGTERM ask the loop to stop after the current step (and checkpoint)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    STOP.clear()
    def on_signal(signum, frame):
        STOP.append(signum)
        signal.signal(signum, signal.SIG_DFL)   # a second one stops at once

    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    except Interrupted as where:
        by = signal.Signals(STOP[0]).name if STOP else "a signal to another rank"
        raise Interrupted(f"{by} at {where}; checkpoint saved. Resume with: "
                          f"{resume_command}") from None
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@contextmanager
def resumable_on_full_disk(resume_command: str):
    """A checkpoint that found the disk full left the previous one intact: say how to continue from it."""
    try:
        yield
    except DiskFull as full:
        raise DiskFull(f"{full}; once there is room, continue the run with: {resume_command}") from None
