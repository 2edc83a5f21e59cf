"""One command line for every entry point: the --help format, the parent parser of the evaluations (each
shared flag spelled and meant one way), old spellings kept for one release, and `run`, the skeleton
every main() goes through (bad input -> one `error:` line and exit 2, preemption -> exit 75).

The shared flags (one meaning everywhere):
  --backbone FILE    the weights to evaluate: anything models.load_backbone reads
  --data-path DIR    the dataset root
  --output-dir DIR   results.json, checkpoints, caches and logs (dense tasks also accept mmseg's --work-dir)
  --resume FILE      continue from this checkpoint; without it, from the last checkpoint in --output-dir when
                     there is one, so the same command re-run (after a requeue, exit 75) continues
  --device, --batch-size (per process), --num-workers (loader processes per process)
  --cache-dir DIR    frozen features are cached here and reused
"""

from __future__ import annotations

import argparse
import copy
import logging
import sys
import threading
from collections.abc import Callable

import torch

from models.errors import MissingDependency, UsageError

from . import distributed
from .io import DiskFullError, disk_full_cause, prepare_output_dir

EXIT_INPUT = 2  # bad input: one `error:` line, nothing done (argparse's own status for a bad flag)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Each flag's default once: argparse's "(default: None)" is dropped, and so is its own when the
    help text already says what the default is."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if action.default is None or action.default is False or "default" in text:
            return text
        return super()._get_help_string(action)

    def _format_action_invocation(self, action: argparse.Action) -> str:
        old = getattr(action, "old", ())
        if old:  # deprecated spellings work but are not advertised
            action = copy.copy(action)
            action.option_strings = [s for s in action.option_strings if s not in old]
        return super()._format_action_invocation(action)


class ArgumentParser(argparse.ArgumentParser):
    """Every entry point's parser: a flag mistake is one `error:` line and exit 2, like any other bad input
    (argparse's own form repeats the whole usage block first); the flags' defaults in --help (HelpFormatter)."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str):
        print(f"error: {message} (--help lists every flag)", file=sys.stderr, flush=True)
        sys.exit(EXIT_INPUT)


# the user's mistakes, and only them: a ValueError or OSError from a bug keeps its traceback
INPUT_ERRORS = (UsageError, MissingDependency)


def run(main: Callable[..., int | None], *args, during: str = "") -> int:
    """main(*args) as every entry point runs it; returns the exit status (main's, 0 for None).

    - models.errors.UsageError (the user's mistakes; MissingFile among them) and MissingDependency: `error:
      <message>` on stderr and EXIT_INPUT (2), never a traceback; checks come before the work, so nothing is
      half done;
    - a full disk or quota: `error: ...` and 1, the last atomic write intact (common.io.DiskFullError; also
      when a library's own writer, tensorboard's say, reports it, wrapped or not);
    - SIGUSR1/SIGTERM/SIGINT: common.distributed.exit_on_preemption, EXIT_REQUEUE (75) whatever the unwinding raises;
      `during` names the phase;
    - data-loader workers are ended at any exit, and the process group is left at the end.
    Any other exception is a bug and keeps its traceback.
    """
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    distributed.exit_on_preemption(during)
    _quiet_disk_full_in_threads()
    try:
        try:
            return main(*args) or 0
        except BaseException:
            # the stop handler's SystemExit is raised wherever the main thread is; a library that was writing
            # may replace it while unwinding (torch.save's zip writer: "unexpected pos"): still a preemption
            if distributed.preempted():
                return distributed.EXIT_REQUEUE
            raise
    except INPUT_ERRORS as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return EXIT_INPUT
    except DiskFullError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except Exception as e:
        full = disk_full_cause(e)
        if full is None:
            raise
        where = f" writing {full.filename}" if full.filename else ""
        print(f"error: {full.strerror}{where}; files written atomically (checkpoints, results) keep their last "
              "good version", file=sys.stderr, flush=True)  # fmt: skip
        return 1
    except SystemExit as e:  # exit_on_preemption's handler: returned, so in-process callers see it too
        if e.code == distributed.EXIT_REQUEUE:
            return distributed.EXIT_REQUEUE
        raise
    finally:
        distributed.cleanup()


def _quiet_disk_full_in_threads() -> None:
    """A writer thread that dies of a full disk (tensorboard's) prints no traceback: its writer raises the error
    again in the main thread, which reports it in one line."""
    hook = threading.excepthook
    if getattr(hook, "quiet_disk_full", False):
        return

    def quiet(args: threading.ExceptHookArgs) -> None:
        if args.exc_value is None or disk_full_cause(args.exc_value) is None:
            hook(args)

    quiet.quiet_disk_full = True
    threading.excepthook = quiet


def start(args: argparse.Namespace) -> torch.device:
    """The first steps of a (torchrun-able) evaluation: a usable --output-dir, the process group, quiet ranks."""
    prepare_output_dir(args.output_dir)
    device, _, _ = distributed.init_distributed(args.device)
    if not distributed.is_main():
        logging.getLogger().setLevel(logging.WARNING)
    return device


def check_positive(args: argparse.Namespace, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")


BACKBONE_HELP = "the weights to evaluate: a pretrain checkpoint.pth / backbone.pth, a reference checkpoint, official "
BACKBONE_HELP += "DINOv2/DINOv3 weights, a folder written by scripts.export (anything models.load_backbone reads)"
RESUME_HELP = (
    "continue from this checkpoint (default: the last checkpoint in --output-dir when there is one, so the same "
    "command re-run continues)"
)


def evaluation_parser(
    *,
    data_path: str | None,
    output_dir: str | None,
    output_default: str = "",
    data_required: bool = True,
    loader: tuple[int, int] | None = None,
    resume: bool = False,
    cache_dir: str | None = None,
    renamed: dict[str, str] | None = None,
    aliases: dict[str, tuple[str, ...]] | None = None,
) -> argparse.ArgumentParser:
    """The parent parser (`parents=[...]`) of every evaluation; each flag has one meaning everywhere.

    data_path: what the dataset root holds (None: no --data-path); output_dir: the default (None: required,
    unless `output_default` says how the task derives it);
    loader: (--batch-size, --num-workers) defaults, with --device (None: the task has no loader);
    resume: the task trains and checkpoints; cache_dir: what --cache-dir defaults to (None: no such flag);
    renamed: {old spelling: flag} accepted with a deprecation line; aliases: {flag: other names} for good.
    """
    old = {new: tuple(o for o, n in (renamed or {}).items() if n == new) for new in (renamed or {}).values()}
    p = argparse.ArgumentParser(add_help=False)

    def a(flag: str, **kwargs) -> None:
        names = (flag, *(aliases or {}).get(flag, ()), *old.get(flag, ()))
        p.add_argument(*names, action=Store, old=old.get(flag, ()), **kwargs)

    a("--backbone", required=True, metavar="FILE", help=BACKBONE_HELP)
    if data_path is not None:
        a("--data-path", required=data_required, metavar="DIR", help=f"dataset root: {data_path}")
    out_help = "results.json, checkpoints, caches and logs go here"
    out_help += f" (default: {output_default})" if output_default else ""
    required = output_dir is None and not output_default
    a("--output-dir", default=output_dir, required=required, metavar="DIR", help=out_help)
    if resume:
        p.add_argument("--resume", action=_Resume, nargs="?", metavar="FILE", help=RESUME_HELP)
    if loader is not None:
        batch_size, num_workers = loader
        a("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="under torchrun: cuda:LOCAL_RANK")
        a("--batch-size", type=int, default=batch_size, help="per process")
        a("--num-workers", type=int, default=num_workers, help="data loading processes per process")
    if cache_dir is not None:
        a("--cache-dir", metavar="DIR", help=f"cache the frozen features here and reuse them (default: {cache_dir})")
    return p


def deprecation(old: str, new: str) -> None:
    print(f"warning: {old} is deprecated, use {new}", file=sys.stderr, flush=True)


class Store(argparse.Action):
    """argparse's "store" that also takes old spellings (`old`) for one release, each use saying so in one
    line; --help shows only the current name (HelpFormatter)."""

    def __init__(self, option_strings, dest, old: tuple[str, ...] = (), **kwargs):
        self.old = tuple(old)
        super().__init__(option_strings, dest, **kwargs)

    # positional past three: argparse.Action's protocol, called so by argparse (tests/test_layers.py)
    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in self.old:
            deprecation(option_string, self.option_strings[0])
        setattr(namespace, self.dest, values)


class OldSwitch(argparse.Action):
    """An old on/off flag kept for one release (hidden from --help): sets `dest` True, saying what replaces it."""

    def __init__(self, option_strings, dest, new: str = "", **kwargs):
        self.new = new
        super().__init__(option_strings, dest, nargs=0, default=False, help=argparse.SUPPRESS, **kwargs)

    # positional past three: argparse.Action's protocol, called so by argparse (tests/test_layers.py)
    def __call__(self, parser, namespace, values, option_string=None):
        deprecation(option_string, self.new)
        setattr(namespace, self.dest, True)


class _Resume(argparse.Action):
    """--resume FILE; a bare --resume (mmseg's switch, the dense tasks' old spelling) is what the default does."""

    # positional past three: argparse.Action's protocol, called so by argparse (tests/test_layers.py)
    def __call__(self, parser, namespace, values, option_string=None):
        if values is None:
            print(
                "warning: --resume without a file is deprecated: the last checkpoint in --output-dir is resumed "
                "by default",
                file=sys.stderr,
                flush=True,
            )
        setattr(namespace, self.dest, values)
