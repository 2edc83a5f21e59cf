"""torch.distributed set-up for torchrun (NCCL on GPU, gloo on CPU) and single-process runs."""

from __future__ import annotations

import atexit
import gc
import os
import signal
import threading

import torch
import torch.distributed as dist

from models.errors import UsageError


def resolve_device(name: str) -> torch.device:
    """--device as a torch.device, or one clear ValueError (unknown name, no such accelerator)."""
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UsageError(f"--device {name}: not a torch device (e.g. cpu, cuda, cuda:1)") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"--device {name}: no CUDA GPU is visible to torch here; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(f"--device {name}: only {torch.cuda.device_count()} GPU(s) visible")
    elif device.type != "cpu" and not getattr(getattr(torch, device.type, None), "is_available", lambda: False)():
        raise UsageError(f"--device {name}: no {device.type} device is available here; use --device cpu")
    return device


def init_distributed(device: str) -> tuple[torch.device, int, int]:
    """Returns (device, rank, world_size); joins the process group when launched by torchrun."""
    resolve_device(device)
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local_rank = int(os.environ.get("LOCAL_RANK", 0))
        if device.startswith("cuda"):
            torch.cuda.set_device(local_rank)
            dev = torch.device("cuda", local_rank)
        else:
            dev = torch.device(device)
        dist.init_process_group(backend=backend(dev))
        return dev, rank, world
    return torch.device(device), 0, 1


def backend(device: torch.device) -> str:
    """The collective backend for tensors on `device`: NCCL for CUDA, gloo for the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def is_main() -> bool:
    return rank() == 0


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def all_reduce_mean(t: torch.Tensor) -> torch.Tensor:
    if is_distributed():
        t = t.clone()
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return t


def broadcast_from_main(obj: object) -> object:
    """Rank 0's value on every rank: decisions that must be the same everywhere (a cache hit, say)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier() -> None:
    if is_distributed():
        dist.barrier()


def cleanup() -> None:
    """Leave the process group while the interpreter is whole. Unreachable cycles can hold it (mmengine's runner
    and its DDP model): collected only during interpreter shutdown, they left gloo's worker threads needing a
    Python lock that no longer existed, and about 1 dense torchrun run in 10 on busy cores ended in SIGABRT
    ("terminate called without an active exception") after finishing its work."""
    gc.collect()
    if is_distributed():
        dist.destroy_process_group()


EXIT_REQUEUE = 75  # "checkpointed, re-run me": the slurm scripts requeue the job on this status (EX_TEMPFAIL)
# what stops a run: slurm's warning (--signal USR1), its time limit or scancel (TERM), Ctrl-C (INT)
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)


def end_workers_at_exit() -> None:
    """Every exit path (an error, a NaN, preemption, the end) ends the data-loader workers at once.

    Pretraining's workers ignore SIGTERM (the main process decides when to stop), and at interpreter
    exit multiprocessing SIGTERMs its children and then joins them: with a loader still referenced
    (a traceback, a persistent iterator) that join never returned. Registered after multiprocessing's
    own handler, this runs first and SIGKILLs the children; the main process writes all state itself.
    """
    import multiprocessing.util  # noqa: F401 - its atexit handler must be registered before ours

    def kill_children() -> None:
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)  # torch's handler would report the killed workers as errors
        for child in multiprocessing.active_children():
            child.kill()
            child.join(timeout=5)

    atexit.register(kill_children)


def exit_on_preemption(during: str = "") -> None:
    """Evaluations: SIGUSR1/SIGTERM/SIGINT (STOP_SIGNALS) end the process with EXIT_REQUEUE at once.

    They only write atomically at safe points (epoch checkpoints, feature caches, mmengine
    checkpoints), so stopping anywhere loses at most the work since the last one; the same command
    re-run resumes from there. Pretraining uses this during its set-up (`during` says what was
    interrupted) and checkpoints mid-epoch once training runs (pretrain.state.StopControl).
    """
    handled = threading.Event()

    def stop(signum, frame):
        if handled.is_set():  # a second delivery (see _redeliver_unhandled) while the first one unwinds
            return
        handled.set()
        where = f" during {during}" if during else ""
        print(f"received {signal.Signals(signum).name}{where}: exiting {EXIT_REQUEUE}, re-run to resume", flush=True)
        raise SystemExit(EXIT_REQUEUE)

    for sig in STOP_SIGNALS:
        signal.signal(sig, stop)
    _redeliver_unhandled(stop, handled)
    end_workers_at_exit()  # every entry point calls this first: no exit path waits on a worker


_watched: list = []  # [handler, Event]: the stop handler the watcher thread re-delivers signals for


def preempted() -> bool:
    """Whether exit_on_preemption's handler has run: the process is stopping with EXIT_REQUEUE."""
    return bool(_watched) and _watched[1].is_set()


def _redeliver_unhandled(handler, handled: threading.Event) -> None:
    """A signal that lands between Python's last check and a blocking system call (a read of a pipe, a
    socket, an NFS file) is noted by the interpreter but its handler never runs: the call is not
    interrupted, and the process neither stops nor says so. A watcher thread, woken through
    signal.set_wakeup_fd, sends the signal to the main thread again until the handler has run.

    Only while `handler` is the one installed: a signal that pretraining's StopControl received (a flag) needs
    no second delivery, and the stop handler may be back by the time this thread looks (StopControl keeps its
    own after a stop it honoured, so that it never is)."""
    if _watched:
        _watched[:] = [handler, handled]
        return
    _watched[:] = [handler, handled]
    read_end, write_end = os.pipe()
    os.set_blocking(write_end, False)
    signal.set_wakeup_fd(write_end, warn_on_full_buffer=False)
    main = threading.main_thread().ident

    def watch() -> None:
        while True:
            signum = os.read(read_end, 1)[0]
            if signum not in STOP_SIGNALS:
                continue
            for _ in range(30):
                handler, handled = _watched
                if signal.getsignal(signum) is not handler or handled.wait(1.0):
                    break  # another handler (StopControl's flag) took it, or the stop handler ran
                if signal.getsignal(signum) is handler:
                    signal.pthread_kill(main, signum)

    threading.Thread(target=watch, name="signal-watcher", daemon=True).start()


def collective_device() -> torch.device:
    """Where collectives run: the current GPU under NCCL, the CPU under gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def sum_across_ranks(t: torch.Tensor) -> torch.Tensor:
    """all_reduce(SUM) on the right device for the backend (gloo: CPU, NCCL: the current GPU)."""
    if not is_distributed():
        return t
    dev = collective_device()
    t = t.to(dev).clone()
    dist.all_reduce(t)
    return t.cpu()


def shard(n: int) -> range:
    """This rank's rows of an n-row tensor that every rank holds (each row is counted once)."""
    return range(rank(), n, world_size())


def gather(t: torch.Tensor) -> torch.Tensor:
    """all_gather of uneven first dims (gloo and NCCL), concatenated."""
    dev = collective_device()
    t = t.to(dev)
    sizes = [torch.zeros(1, dtype=torch.long, device=dev) for _ in range(world_size())]
    dist.all_gather(sizes, torch.tensor([t.shape[0]], device=dev))
    n = int(max(s.item() for s in sizes))
    padded = torch.zeros((n, *t.shape[1:]), dtype=t.dtype, device=dev)
    padded[: t.shape[0]] = t
    out = [torch.zeros_like(padded) for _ in sizes]
    dist.all_gather(out, padded)
    return torch.cat([o[: int(s.item())] for o, s in zip(out, sizes)]).cpu()
