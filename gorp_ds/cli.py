"""The ``gorp-ds`` command: one entry point for training, evaluation, export and the memory model.

    gorp-ds train [run flags]                 # one process, no launcher needed
    deepspeed --module gorp_ds train --ds_config ds_configs/zero2.json [run flags]
    torchrun --nproc_per_node 8 -m gorp_ds train [run flags]
    gorp-ds eval --model runs/cl/gorp/export --tasks dbpedia,amazon
    gorp-ds export runs/cl/gorp runs/cl/gorp_hf
    gorp-ds memory --model 7b --world 8 --stage 2,3

``launch/train.py`` is ``gorp-ds train`` for a checkout. Each subcommand's ``--help`` lists its
settings.

Exit status of ``train`` and ``eval``: 0 done; 2 bad input, a busy port or a checkpoint that cannot
be written or read (one ``gorp_ds: error:`` line); 75 pre-empted by SIGTERM/SIGUSR1 after the last
step was checkpointed (resume with ``--resume``; the SLURM script requeues on 75).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

from .faults import FaultPlan
from .faults import install as install_faults
from .log import local_rank

if TYPE_CHECKING:
    from .cl.session import MethodSession

TRAIN_DESCRIPTION = """\
A whole continual-learning task sequence in one launch: for each method, train every task, measure
the accuracy matrix R after each, and report AA / BWT / FWT / forgetting.

Settings: every one is listed below (grouped by section, with its default); a run file holds the
same settings by section (`optimizer: {rank: 8}`) or flat (`rank: 8`); `--print-config` shows the
resolved values and their sources.

Bad input (missing data, unknown task or method, targets that match nothing, a DeepSpeed config
that contradicts the run, an --output-dir holding another run, a port in use) stops every rank
before training with one line and status 2, printed once per node (by its local rank 0) with the
node's host name; so does a run whose loss or gradients stay non-finite. Status 75: pre-empted by
SIGTERM/SIGUSR1 after the last step was checkpointed (resume with --resume)."""

EXPORT_DESCRIPTION = """\
Export a saved checkpoint as a Hugging Face model directory, on one process:

    gorp-ds export runs/order_1/gorp runs/order_1/gorp_hf                   # the method's latest checkpoint
    gorp-ds export runs/order_1/gorp/checkpoints/task02_step000000 out/     # one tag: after task 1

(python -m gorp_ds.export is the same command.) The checkpoint may have been written on any
number of ranks. The method, model and LoRA settings come from the checkpoint; the engine is rebuilt
and the checkpoint loaded through the public checkpoint API, then the weights are written with every
LoRA merged in fp32 from the masters."""


def main(argv: list[str] | None = None) -> int:
    """``gorp-ds <command> …``; the status to exit with."""
    argv = _without_launcher_rank(list(sys.argv[1:] if argv is None else argv))
    commands: dict[str, tuple[Callable[[list[str], str], int], str]] = {
        "train": (train, "train and evaluate methods over a task sequence (the main job)"),
        "eval": (evaluate, "evaluate a model or checkpoint on the task list and any --eval-tasks (train --eval-only)"),
        "export": (export, "write a checkpoint as a Hugging Face model directory, LoRA merged"),
        "memory": (memory, "predict the peak GPU memory of a setup (model, world size, ZeRO stage)"),
    }
    usage = "gorp-ds {" + ",".join(commands) + "} [options]"
    if not argv or argv[0] in ("-h", "--help"):
        lines = [f"usage: {usage}", "", __doc__.split("\n\n")[0], "", "commands:"]
        lines += [f"  {name:<8} {summary}" for name, (_, summary) in commands.items()]
        print("\n".join(lines))
        return 0 if argv else 2
    if argv[0] not in commands:
        return user_error(f"gorp_ds: error: unknown command {argv[0]!r}; commands: {', '.join(commands)} "
                          f"(usage: {usage})")
    command, _ = commands[argv[0]]
    return command(argv[1:], f"gorp-ds {argv[0]}")


def _without_launcher_rank(argv: list[str]) -> list[str]:
    """``deepspeed`` puts ``--local_rank=N`` before the script's own arguments (so before the
    subcommand); the rank is also in LOCAL_RANK, which is what the run reads."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg.startswith(("--local_rank=", "--local-rank=")):
            continue
        elif arg in ("--local_rank", "--local-rank"):
            skip = True
        else:
            kept.append(arg)
    return kept


# ------------------------------------------------------------------------------------------ train
class FlagParser(argparse.ArgumentParser):
    """argparse, with a bad flag reported as every other user error: one ``gorp_ds: error:`` line
    (not the whole usage), naming the closest known flags of a misspelled one."""

    def error(self, message: str) -> None:  # type: ignore[override]
        import difflib

        known = [flag for flag in self._option_string_actions if flag.startswith("--")]
        unknown = [word.split("=", 1)[0] for word in message.split(": ", 1)[-1].split()
                   if message.startswith("unrecognized arguments") and word.startswith("-")]
        close = [match for word in unknown for match in difflib.get_close_matches(word, known, n=1, cutoff=0.75)]
        hint = f"; did you mean {', '.join(close)}?" if close else ""
        self.exit(2, f"gorp_ds: error: {socket.gethostname()}: {self.prog}: {message}{hint} "
                     f"('{self.prog} --help' lists the flags)\n")


def train_parser(prog: str) -> argparse.ArgumentParser:
    """The run's command line: generated from the settings' dataclasses (``gorp_ds.cl.config``)."""
    from .cl import add_arguments

    parser = FlagParser(prog=prog, description=TRAIN_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return parser


# Options of the launchers (deepspeed, torchrun), which belong before the script, not after it.
LAUNCHER_OPTIONS = ("--master_port", "--master_addr", "--master-port", "--master-addr", "--num_gpus", "--num_nodes",
                    "--hostfile", "--include", "--exclude", "--nproc_per_node", "--nproc-per-node", "--nnodes",
                    "--node_rank", "--node-rank", "--no_ssh", "--rdzv-endpoint", "--rdzv_endpoint")


def train(argv: list[str], prog: str = "gorp-ds train", start: bool = True) -> int:
    """Parse the run's flags, run it, and return the exit status (0, 2 or 75). ``start=False``:
    only the checks made before any process group starts (:func:`check_before_start`)."""
    misplaced = [arg.split("=", 1)[0] for arg in argv if arg.split("=", 1)[0] in LAUNCHER_OPTIONS]
    if misplaced:
        flag = misplaced[0]
        return user_error(f"gorp_ds: error: {flag} is an option of the launcher, not of the run: put it before the "
                          f"script (deepspeed {flag} … launch/train.py …, torchrun {flag} … -m gorp_ds train …; with "
                          f"make: make run LAUNCH_ARGS='{flag} …', and run flags in ARGS)")
    parsed = _parse(train_parser(prog), argv)
    if isinstance(parsed, int):
        return parsed
    try:
        status, unprinted = _run(parsed, start)
        if unprinted is not None and prints_errors():  # printed before the process group is torn down
            user_error(unprinted, status)
            unprinted = None
    finally:
        _shutdown_distributed()
    return user_error(unprinted, status) if unprinted is not None else status  # the other ranks' wait


def check_before_start(argv: list[str], prog: str = "gorp-ds train") -> int:
    """What ``train`` checks before any process group starts (the settings from flags, run file and
    presets; the DeepSpeed JSON), with the output and status ``train`` gives: 0 when they pass, 2
    with one ``gorp_ds: error:`` line when not. The property tests call it for generated input."""
    return train(argv, prog, start=False)


def evaluate(argv: list[str], prog: str = "gorp-ds eval") -> int:
    return train(["--eval-only", *argv], prog)


# ------------------------------------------------------------------------ user errors, printed once
# Every rank of a launch parses the same flags and meets the same bad input (the runner agrees on
# problems found after start-up, cl/agree.py), and each node's local rank 0 prints it. The other
# ranks must not exit first: DeepSpeed's and torchrun's launchers stop every rank as soon as one
# exits with an error, and would stop the rank about to print. So they wait for the launcher to
# stop them (at most QUIET_WAIT_S), then exit with the same status, printing their own line only if
# they were never stopped (a problem only they saw).
QUIET_WAIT_S = 60.0


def prints_errors() -> bool:
    """Whether this process prints the run's user errors: a node's local rank 0 (or the only process)."""
    return local_rank() == 0


def user_error(text: str, status: int = 2) -> int:
    """Print ``text`` (one ``gorp_ds: error:`` line, or argparse's usage) from the printing rank;
    on the others, wait as described above. Returns ``status``."""
    if prints_errors():
        print(text, file=sys.stderr, flush=True)
        return status

    def stop(signum: int, frame: object) -> None:  # the launcher stopping this rank: quietly, same status
        os._exit(status)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):
        signal.signal(sig, stop)
    time.sleep(QUIET_WAIT_S)
    print(text, file=sys.stderr, flush=True)
    return status


def _parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace | int:
    """The parsed flags, or the status to exit with (``--help``: 0 after printing it; a bad flag:
    one ``gorp_ds: error:`` line, 2) — printed by the printing rank only."""
    if prints_errors():
        return parser.parse_args(argv)
    captured = io.StringIO()
    try:
        with contextlib.redirect_stdout(captured), contextlib.redirect_stderr(captured):
            return parser.parse_args(argv)
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else 2
        return user_error(captured.getvalue().rstrip("\n"), status) if status else status


def _run(args: argparse.Namespace, start: bool = True) -> tuple[int, str | None]:
    """The run's status, and a user error this rank has not printed (see :func:`user_error`)."""
    from .cl import build_run_config
    from .cl.command_line import format_config
    from .cl.preemption import REQUEUE_STATUS, Preempted, write_requeue_marker
    from .cl.user_errors import USER_ERRORS
    from .resources import default_ds_config

    try:
        cfg = build_run_config(args)
        if args.print_config:
            if local_rank() == 0 and os.environ.get("RANK", "0") == "0":
                print(format_config(cfg), flush=True)
            return 0, None
        from .cl.runner import run
        from .zero.config_checks import check_ds_config_file

        # An empty --ds_config is a file that does not exist, not the default.
        ds_config = args.ds_config if args.ds_config is not None else str(default_ds_config(cfg.base_model.dtype))
        if not cfg.runner.eval_only:  # before any process group: DeepSpeed's model and GORP's refusals
            check_ds_config_file(ds_config)
        if not start:
            return 0, None
        install_faults(FaultPlan.from_environment())  # the crash tests' faults, read once (faults.py)
        run(cfg, ds_config)
    except USER_ERRORS as err:
        # Once per node: every rank of a launch stops with the same error (the runner agrees on it
        # across ranks), and a node's local rank 0 says so with the node's name (user_error).
        _close_progress_bars()
        return 2, f"gorp_ds: error: {socket.gethostname()}: {one_line(err)}"
    except Preempted as stop:  # SIGTERM/SIGUSR1: the checkpoint of the last step is committed
        _close_progress_bars()
        write_requeue_marker(stop.checkpoint)
        if os.environ.get("RANK", "0") == "0":
            print(f"gorp_ds: {stop}", file=sys.stderr, flush=True)
        return REQUEUE_STATUS, None
    return 0, None


# What str.splitlines breaks a line at: a value or key quoted in a message (a run-file key with a
# NEL, a path with a newline) must not make the one error line two.
_LINE_BREAKS = str.maketrans({c: repr(c)[1:-1] for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"})
_DETAIL = "\n  "  # a message's own indented detail lines (--resume lists each differing field so)


def one_line(message: object) -> str:
    """``message`` with each line break written as its escape (``\\n``), but for the indented detail
    lines a message lays out itself: one ``gorp_ds: error:`` line whatever the message quotes."""
    return _DETAIL.join(part.translate(_LINE_BREAKS) for part in str(message).split(_DETAIL))


def _shutdown_distributed() -> None:
    """Destroy the process group before the interpreter exits, whatever the exit status: the
    communication library's threads and sockets are closed in order instead of by the interpreter's
    teardown."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _close_progress_bars() -> None:
    """End an interrupted progress bar's line, so that the message starts a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


# ------------------------------------------------------------------------------- export, memory
def export(argv: list[str], prog: str = "gorp-ds export") -> int:
    """Rebuild a checkpoint's session and write its Hugging Face directory; the exit status (0 or 2).

    Here rather than in ``gorp_ds.export``: it rebuilds the run layer's session, and the run layer
    imports the export layer, not the other way round."""
    parser = FlagParser(prog=prog, description=EXPORT_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a method's output directory, its checkpoints/ folder, or one tag folder")
    parser.add_argument("out_dir", help="the Hugging Face directory to write (replaced if it exists)")
    args = parser.parse_args(argv)

    from .cl.restore import find_checkpoint, rebuild_session
    from .cl.user_errors import USER_ERRORS
    from .safe_write import path_problem

    if (problem := path_problem(args.out_dir, f"out_dir {args.out_dir}")) is not None:
        print(f"gorp_ds: error: {problem}", file=sys.stderr)
        return 2
    found = find_checkpoint(args.checkpoint)
    if found is None:
        print(f"gorp_ds: error: {args.checkpoint}: not a checkpoint (expected a method's output directory with "
              "checkpoints/latest, a checkpoints/ folder, or a tag folder with gorp_state/)", file=sys.stderr)
        return 2
    import torch.distributed as dist

    from .cl.process_group import init_process_group

    try:
        init_process_group()
        session = rebuild_session(*found, tasks=[], world=dist.get_world_size(),
                                  out_dir=os.path.dirname(os.path.abspath(args.out_dir)))
        if session.export(args.out_dir) is not None:  # rank 0 wrote the directory
            _write_prompt_record(session, args.out_dir)
        session.close()
    except USER_ERRORS as err:
        print(f"gorp_ds: error: {one_line(err)}", file=sys.stderr, flush=True)
        return 2
    return 0


def _write_prompt_record(session: MethodSession, out_dir: str) -> None:
    """The run's prompt record beside the export, as the run writes it, from the run's own task list
    (its saved settings). Where those tasks cannot be loaded here (a data directory moved since),
    the export stays usable and the log says why the record is missing."""
    from .cl.prompt_record import write_prompt_record
    from .data import DataError, load_task_sequence
    from .log import get_logger

    try:
        tasks = load_task_sequence(session.cfg.data)
    except DataError as err:
        get_logger(__name__).warning(f"{out_dir}: no prompt record written (the run's tasks do not load here: {one_line(err)})")
        return
    write_prompt_record(tasks, session.tokenizer, session.cfg, session.method, out_dir)


def memory(argv: list[str], prog: str = "gorp-ds memory") -> int:
    from .planning.memory_table import main as memory_main

    try:
        return memory_main(argv, prog)
    except SystemExit as stop:  # argparse's exits and the table's own status-2 exit
        return stop.code if isinstance(stop.code, int) else 2


def exit_keeping_status(status: int) -> None:
    """Exit with ``status`` once everything is written, without the interpreter's teardown.

    Two-rank CPU launches were seen to abort after a clean finish, in the teardown that follows
    ``sys.exit`` ("terminate called without an active exception" from a C++ destructor; about one
    launch in sixty of the test suite, never reproduced alone), and the launcher then reported 250
    instead of 0, 2 or 75: a pre-empted SLURM job would not be requeued. So the Python-level
    clean-up runs here, in order: the ``atexit`` handlers (W&B's finish among them), the logging
    handlers, the standard streams; then ``os._exit`` skips the module teardown and the C++ static
    destructors, where nothing of the run is left to write (results, checkpoints and TensorBoard
    events are written and flushed as they are produced)."""
    import atexit
    import logging

    try:
        atexit._run_exitfuncs()
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
    finally:
        os._exit(status)


def console_main() -> None:
    """The ``gorp-ds`` console script."""
    exit_keeping_status(main())
