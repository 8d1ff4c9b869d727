"""Several processes through torch.distributed, as `torchrun` and `accelerate launch` start them.

Those launchers set RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; without them (or with WORLD_SIZE 1)
a run is one process and nothing here initialises anything. We start no processes ourselves.

The processes exchange only small Python objects (a refusal to share, each one's counts for the summary) and meet
at barriers; no tensor crosses them. So the process group is always gloo: it runs on CPUs and GPUs alike, and NCCL,
made for moving tensors between GPUs, would add nothing but the need to pin a device before the first barrier. Each
process computes on its own device, cuda:LOCAL_RANK (see device_for).

Images are split by position in the run's deterministic order: process r takes images r, r + N, r + 2N, ... Every
image gets the same seed in any process (the draws depend on the seed only), so the union of the processes'
outputs equals a one-process run.

The group's timeout is long on purpose: a process that finishes its share waits at the final barrier for the
slowest, which may take hours on a big dataset. When a process dies the survivors see it two ways, in either
order: a collective that fails (gloo: "Connection closed by peer"), raised here as GroupLost, and the launcher's
SIGTERM, which sigterm_as_interrupt turns into the Ctrl-C path. Either way a survivor finishes the writes under
way, adds its counts to summary.json itself (the group can no longer gather them) and exits with the run's
stopped (3) or interrupted (130) status, not 1; --resume completes the folder.
"""
from __future__ import annotations

import datetime
import os
import signal
import threading
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from ...layer_catalog.errors import DiffusionFeatureError, echo, public_module

TIMEOUT = datetime.timedelta(days=7)


class GroupLost(DiffusionFeatureError, RuntimeError):
    """A collective failed: another process of the run is gone (killed, crashed)."""


def _collective(call, *args, **kwargs):
    try:
        return call(*args, **kwargs)
    except RuntimeError as e:  # gloo's errors (DistBackendError is a RuntimeError) span lines: keep the first
        first = (str(e).strip().splitlines() or [""])[0]
        raise GroupLost(f"another process of the run is gone ({first[:200]})") from None


@dataclass
class Ranks:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    initialised: bool = False

    @property
    def main(self) -> bool:
        return self.rank == 0

    def share(self, items: list) -> list:
        """This process's part of the run's items."""
        return items[self.rank::self.world]

    def barrier(self) -> None:
        if self.initialised:
            _collective(torch.distributed.barrier)

    def broadcast(self, obj):
        """rank 0's object, on every process."""
        if not self.initialised:
            return obj
        box = [obj]
        _collective(torch.distributed.broadcast_object_list, box, src=0)
        return box[0]

    def gather(self, obj) -> list:
        """Every process's object, in rank order, on every process."""
        if not self.initialised:
            return [obj]
        boxes = [None] * self.world
        _collective(torch.distributed.all_gather_object, boxes, obj)
        return boxes

    def close(self) -> None:
        if self.initialised:
            torch.distributed.destroy_process_group()
            self.initialised = False


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"the environment variable {name}={echo(value)} must be an integer (torchrun and accelerate "
                         "launch set it)") from None


def from_env() -> Ranks:
    """The process's place in a launched group (initialising gloo), or a single process."""
    world = _env_int("WORLD_SIZE", 1)
    rank = _env_int("RANK", 0)
    local = _env_int("LOCAL_RANK", 0)
    if world < 1 or not 0 <= rank < world:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={world} do not describe a process group")
    if world == 1:
        return Ranks(0, 1, local, False)
    for name in ("MASTER_ADDR", "MASTER_PORT"):
        if not os.environ.get(name):
            raise ValueError(f"WORLD_SIZE={world} but {name} is not set: start several processes with torchrun or "
                             "accelerate launch, which set it")
    if not torch.distributed.is_available():
        raise ValueError("this torch build has no torch.distributed; run one process (without WORLD_SIZE)")
    torch.distributed.init_process_group("gloo", init_method="env://", rank=rank, world_size=world, timeout=TIMEOUT)
    return Ranks(rank, world, local, True)


def device_for(device: str, ranks: Ranks) -> str:
    """cuda (or cuda:N) means this process's own GPU, cuda:LOCAL_RANK, when launched; other devices stay as they
    are. A single process keeps what it was given."""
    if ranks.world == 1 or not str(device).startswith("cuda"):
        return device
    return f"cuda:{ranks.local_rank}"


class Terminated(KeyboardInterrupt):
    """SIGTERM (a launcher stopping the survivors of a failed process, or `kill`), taken like Ctrl-C. Not under
    DiffusionFeatureError: that is an Exception, and `except Exception` must not swallow a stop."""


Terminated.__module__ = public_module(__name__)


@contextmanager
def sigterm_as_interrupt(keep_ignoring: bool = False):
    """While the block runs, the first SIGTERM raises Terminated in the main thread (the run stops as for Ctrl-C:
    the writes under way finish); once `armed` is set False (the run is writing its summary), SIGTERMs are
    ignored, so the summary is not cut short. keep_ignoring: they stay ignored after a disarmed block, for a
    process of a launched group that is about to exit with the run's status (the launcher's SIGTERM, sent when
    another process died, would otherwise replace that status with -15 during the exit). A no-op outside the main
    thread."""
    class State:
        armed = True

    def handler(signum, frame):
        if State.armed:
            State.armed = False
            raise Terminated()

    if threading.current_thread() is not threading.main_thread():
        yield State
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield State
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_IGN if keep_ignoring and not State.armed else previous)
