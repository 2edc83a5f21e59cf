"""Every exit path ends the process and its data-loader workers within seconds, with the real exit status:
an error raised mid-epoch in pretraining and in every evaluation that uses workers. Before, a crashed run
with workers could wait forever in multiprocessing's exit-time join (pretraining's workers ignore
SIGTERM), holding a cluster allocation until its time limit."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from common import cli, distributed
from pretrain.state import StopControl
from tests.helpers import (
    DENSE_HEADS,
    DENSE_TINY,
    DIM,
    ROOT,
    TINY_RUN,
    child_env,
    make_ade,
    make_cub,
    make_image_folder,
    make_nyu,
    make_splits,
    student_adaptors,
    write_openai_clip,
)

CRASH = """# {token}
import runpy, sys
import common.features as features
import pretrain.output as output
calls = [0]
def crash(*args, **kwargs):
    calls[0] += 1
    if calls[0] == 2:
        raise RuntimeError("injected failure mid-epoch")
    return real(*args, **kwargs)
if {in_pretraining}:
    real = output.json.dumps  # the iteration log line, written every iteration
    output.json = type("Json", (), {{"dumps": staticmethod(crash), "loads": staticmethod(output.json.loads)}})
else:
    real = features.Progress.step  # the per-batch progress of extraction and of the linear probe's epochs
    features.Progress.step = lambda self, *a, **k: crash(self, *a, **k)
sys.argv = [{module!r}, *{argv!r}]
runpy.run_module({module!r}, run_name="__main__", alter_sys=True)
"""


def processes_with(token: str) -> list[int]:
    """PIDs whose command line holds `token` (forked workers keep their parent's command line)."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if token in cmdline.read_bytes().decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


def run_crashing(module: str, argv: list[str], token: str, in_pretraining: bool = False) -> subprocess.CompletedProcess:
    code = CRASH.format(token=token, in_pretraining=in_pretraining, module=module, argv=argv)
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=120)  # fmt: skip


def check_ended(proc, token: str) -> None:
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "RuntimeError: injected failure mid-epoch" in proc.stderr
    assert "is killed by signal" not in proc.stderr  # ending the workers is not reported as a second error
    time.sleep(0.5)
    assert processes_with(token) == [], "data-loader workers outlived their run"


def test_a_crashed_pretraining_run_with_workers_exits(tmp_path):
    data = make_image_folder(tmp_path / "data", per_class=8)
    token = f"crash-token-{tmp_path.name}"
    argv = ["--data-path", str(data), "--output-dir", str(tmp_path / "o"), "--epochs", "3", *TINY_RUN,
            "--num-workers", "2", "--epoch-length", "6"]  # fmt: skip
    proc = run_crashing("pretrain.main", argv, token, in_pretraining=True)
    check_ended(proc, token)


@pytest.mark.parametrize("module", ["linear_eval.main", "linear_eval.knn", "linear_eval.zeroshot", "fine_grained.main"])
def test_a_crashed_evaluation_with_workers_exits(tmp_path, backbone, module):
    token = f"crash-token-{module}-{tmp_path.name}"
    out = ["--output-dir", str(tmp_path / "o")]
    if module == "linear_eval.zeroshot":  # a tiny CLIP in OpenAI's format and the student's CLIP adaptor
        write_openai_clip(tmp_path / "clip.pt")
        adaptors = student_adaptors(DIM, {"clip_tiny": (64, "clip")}).export({"name": "vit_tiny"})
        torch.save(adaptors, tmp_path / "adaptors.pth")
        out += ["--clip-checkpoint", str(tmp_path / "clip.pt"), "--adaptors", str(tmp_path / "adaptors.pth")]
    if module == "fine_grained.main":
        make_cub(tmp_path / "fg")
        argv = ["--backbone", str(backbone), "--data-path", str(tmp_path / "fg"), "--datasets", "cub200",
                "--input-size", "28", "--batch-size", "2", "--device", "cpu", "--num-workers", "2", *out]  # fmt: skip
    else:
        data = make_splits(tmp_path / "data", train=8)
        argv = ["--data-path", str(data), "--backbone", str(backbone), "--input-size", "28", "--batch-size", "2",
                "--num-workers", "2", "--device", "cpu", *out]  # fmt: skip
    if module == "linear_eval.knn":
        argv += ["--nb-knn", "5"]
    proc = run_crashing(module, argv, token)
    check_ended(proc, token)


@pytest.mark.parametrize("config", ["segmentation/configs/linear_vit_small.py", "depth/configs/linear_vit_small.py"])
def test_a_dense_run_whose_worker_fails_mid_training_exits(tmp_path, backbone, config):
    """mmengine's persistent train workers: a training annotation that opens (the check before training
    reads headers only) but cannot be decoded fails in a worker at iteration 3; the run ends, workers too."""
    pytest.importorskip("mmseg", reason="mmsegmentation not installed: `make mmseg`")
    task = config.split("/")[0]
    data = (make_ade if task == "segmentation" else make_nyu)(tmp_path / "data")
    bad = sorted((data / "annotations" / ("training" if task == "segmentation" else "train")).iterdir())[1]
    bad.write_bytes(bad.read_bytes()[:60])  # the PNG header, no pixel data
    work = tmp_path / f"crash-token-{task}"  # in the command line of the run and of its forked workers
    workers = ["train_dataloader.num_workers=2", "train_dataloader.persistent_workers=True"]
    run = ["train_cfg.max_iters=50", "train_dataloader.batch_size=1", "randomness.seed=0",  # the 3rd image is bad
           "default_hooks.logger.interval=1"]  # fmt: skip
    options = [*DENSE_TINY, *DENSE_HEADS[config], *workers, *run]
    cmd = [sys.executable, "-m", f"{task}.main", str(ROOT / config), "--backbone", str(backbone), "--data-path",
           str(data), "--output-dir", str(work), "--cfg-options", *options]  # fmt: skip
    log = tmp_path / "output.txt"
    error = "in DataLoader worker process"  # the main process's traceback: "Caught OSError in DataLoader worker ..."
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=child_env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # fmt: skip
    try:
        deadline = time.time() + 300  # mmengine's start on 2 busy cores
        while error not in log.read_text() and time.time() < deadline:
            time.sleep(0.2)
            if proc.poll() is not None:
                break
        proc.wait(timeout=60)  # from the error's traceback to the end of the process
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"the run did not end within 60 s of its error:\n{log.read_text()[-3000:]}")
    output = log.read_text()
    assert proc.returncode == 1, output[-3000:]
    assert "Iter(train) [ 2/50]" in output and error in output, output[-3000:]
    time.sleep(0.5)
    assert processes_with(str(work)) == [], "data-loader workers outlived their run"


def test_a_loader_kept_alive_at_exit_does_not_hang(tmp_path):
    """The mechanism itself: an iterator of workers that ignore SIGTERM, still referenced at exit."""
    token = f"crash-token-mechanism-{tmp_path.name}"
    code = f"""# {token}
import sys
from torch.utils.data import DataLoader
from common import distributed
from pretrain.data import worker_init
distributed.end_workers_at_exit()
loader = DataLoader(list(range(64)), batch_size=2, num_workers=2, worker_init_fn=worker_init, persistent_workers=True)
ITERATOR = iter(loader)
next(ITERATOR)
raise RuntimeError("injected failure mid-epoch")
"""
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=120)  # fmt: skip
    check_ended(proc, token)


SIGNAL_TO_ANOTHER_THREAD = """
import os, signal, threading
from common import cli
def main():
    read_end, _ = os.pipe()
    side = threading.Thread(target=threading.Event().wait, daemon=True)
    side.start()
    # the handler's C part runs in the side thread: the interpreter notes the signal, the main thread's read()
    # is not interrupted and would block for good
    threading.Timer(0.5, signal.pthread_kill, (side.ident, signal.SIGTERM)).start()
    os.read(read_end, 1)
raise SystemExit(cli.run(main, during="the read"))
"""


def test_a_signal_noted_during_a_blocking_call_still_stops_the_run():
    """A SIGTERM whose handler cannot run (the main thread sits in a blocking system call it did not
    interrupt) is re-delivered to the main thread (common.distributed): exit 75 and the line, not a hang."""
    proc = subprocess.run([sys.executable, "-c", SIGNAL_TO_ANOTHER_THREAD], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 75, proc.stdout + proc.stderr
    assert "received SIGTERM during the read: exiting 75" in proc.stdout


SIGNAL_DURING_A_SAVE = """
import builtins, os, signal, sys, torch
from common import cli, io
path = sys.argv[1]
class SignalledFile:  # SIGUSR1 arrives while torch's zip writer is inside one of its writes
    def __init__(self, f):
        self.f, self.writes = f, 0
    def write(self, data):
        self.writes += 1
        if self.writes == 3:
            os.kill(os.getpid(), signal.SIGUSR1)
        return self.f.write(data)
    def __getattr__(self, name):
        return getattr(self.f, name)
    def __enter__(self):
        return self
    def __exit__(self, *exc):
        return self.f.__exit__(*exc)
def main():
    io.atomic_save({"epoch": 0}, path)
    io.open = lambda *args: SignalledFile(builtins.open(*args))  # the file atomic_save hands torch
    io.atomic_save({"epoch": 1, "weights": torch.zeros(1000)}, path)
raise SystemExit(cli.run(main))
"""


def test_a_signal_during_a_checkpoint_write_still_exits_75(tmp_path):
    """The stop handler's SystemExit raised inside torch.save is replaced by torch's own RuntimeError
    ("unexpected pos") as its zip writer closes: still exit 75 and no traceback (slurm requeues on 75), the
    last checkpoint intact and no temp file left."""
    path = tmp_path / "checkpoint.pth"
    proc = subprocess.run([sys.executable, "-c", SIGNAL_DURING_A_SAVE, str(path)], cwd=ROOT, env=child_env(),
                          capture_output=True, text=True, timeout=60)  # fmt: skip
    assert proc.returncode == 75, proc.stdout + proc.stderr
    assert "received SIGUSR1: exiting 75" in proc.stdout and "Traceback" not in proc.stderr
    assert torch.load(path, weights_only=True) == {"epoch": 0} and [p.name for p in tmp_path.iterdir()] == [path.name]


@pytest.fixture
def stop_handlers():
    """The process's handlers of the stop signals, as they were before the test installed its own."""
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGUSR1, signal.SIGTERM, signal.SIGINT)}
    yield
    for sig, handler in previous.items():
        signal.signal(sig, handler)


def test_ctrl_c_stops_an_evaluation_like_sigterm(capsys, stop_handlers):
    """Before, SIGINT was Python's KeyboardInterrupt: a traceback, and pretraining wrote no checkpoint."""

    def main():
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(10)

    assert cli.run(main, during="the test") == 75
    assert "received SIGINT during the test: exiting 75, re-run to resume" in capsys.readouterr().out


def test_a_stop_pretraining_took_is_never_delivered_again_to_the_set_up_handler(capsys, stop_handlers):
    """StopControl takes a SIGUSR1 and its run stops (checkpoint written) within the second the signal watcher
    waits for a handler to run: the set-up handler, back after StopControl, must not get the signal again.
    Before, it did: a second "received SIGUSR1 during set-up" line, about 1 run in 13."""
    distributed.exit_on_preemption("set-up")
    with StopControl() as control:
        os.kill(os.getpid(), signal.SIGUSR1)
        deadline = time.time() + 10
        while not control.signalled and time.time() < deadline:
            time.sleep(0.01)
    time.sleep(2.5)  # the watcher re-delivers after 1 s without the stop handler having run
    assert control.signalled and "received" not in capsys.readouterr().out
