"""Clean early exits for time-limited jobs: a SIGTERM, a time budget, or a step interval."""
from __future__ import annotations

import signal
import threading
import time

import torch
import torch.distributed as dist

from megamoe.config import Config
from megamoe.errors import ConfigError
from megamoe.parallel import Topology


class EarlyExit:
    """Megatron's clean early exits: at a SIGTERM (--exit-signal-handler; Slurm's `--signal=TERM@120` to srun
    tasks; a torchrun agent forwards it but kills its workers 30 s later), after --exit-duration-in-mins, or
    every --exit-interval steps. The run saves a checkpoint (with --save) and returns; every rank stops at the same
    step, since a signal or a clock reaches the ranks at different steps."""

    def __init__(self, cfg: Config, topo: Topology, start: float):
        self.cfg, self.topo = cfg.training, topo
        self.signalled = False
        self.start = start  # time.monotonic() when the run started, set-up included (as Megatron counts)
        self._installed = self.cfg.exit_signal_handler
        if self._installed:
            if threading.current_thread() is not threading.main_thread():
                raise ConfigError("--exit-signal-handler installs a SIGTERM handler, which Python allows only on "
                                  "the main thread; call train() there or drop the flag")
            self._previous = signal.signal(signal.SIGTERM, self._on_signal)

    def _on_signal(self, signum, frame) -> None:
        self.signalled = True

    def reason(self, step: int) -> str | None:
        """Why the run stops after `step`, the same on every rank; None to go on."""
        t = self.cfg
        if t.exit_signal_handler or t.exit_duration_in_mins:
            late = t.exit_duration_in_mins and time.monotonic() - self.start > 60 * t.exit_duration_in_mins
            flag = torch.tensor([2 if self.signalled else 1 if late else 0], device=self.topo.device)
            if dist.is_initialized() and dist.get_world_size() > 1:
                dist.all_reduce(flag, op=dist.ReduceOp.MAX)
            flag = int(flag.item())
            if flag == 2:
                return "SIGTERM received (--exit-signal-handler)"
            if flag == 1:
                return f"--exit-duration-in-mins {t.exit_duration_in_mins} reached"
        if t.exit_interval and step % t.exit_interval == 0:
            return f"--exit-interval {t.exit_interval}"
        return None

    def __enter__(self) -> EarlyExit:
        return self

    def __exit__(self, *exc) -> None:
        if self._installed:  # None: the previous handler was not set from Python; the default then
            signal.signal(signal.SIGTERM, self._previous if self._previous is not None else signal.SIG_DFL)
