"""Command-line conventions shared by every program of the package.

A user mistake or a bad input gives ONE line on stderr that names the file or
flag and what to do, and an exit status that says which kind of failure it
was; a traceback is printed only for a bug in the program (and then in full):

  * 0: the work was done;
  * 1 (`WorkError`): the arguments were fine but the work failed or was
    incomplete (an unreadable image, a corrupt checkpoint, nothing produced);
  * 2 (`UsageError`, argparse errors): a bad flag or argument, a missing input
    path; found before any model is built.

Programs raise `UsageError` / `WorkError` anywhere below their `main` and wrap
it with `run_main`; `ArgumentParser` makes argparse's own errors one line too.
`run_main` also prints Python warnings (a random-weights notice, a library's
deprecation) as one `prog: warning: ...` line, without the source line that
Python's default format adds.
"""

from __future__ import annotations

import argparse
import os
import sys
import warnings
from typing import Any, Callable, Optional, Sequence

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

EXIT_STATUS_HELP = ("Exit status: 0 when the work was done; 1 when it failed or was incomplete "
                    "(a bad input file, nothing produced; one line names the cause); 2 for a "
                    "usage error (bad flag or argument, missing input path), reported before "
                    "any model is built.")


class UsageError(Exception):
  """A mistake in the command line (exit status 2)."""


class WorkError(Exception):
  """Valid arguments, but the work could not be done (exit status 1)."""


class ArgumentParser(argparse.ArgumentParser):
  """argparse with a one-line error (`prog: error: ... (see --help)`), exit 2.

  Stock argparse prints the whole usage block before the message; with a
  dozen options the message is lost under it.
  """

  def error(self, message: str):  # noqa: D401 - argparse's name
    self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def error_line(prog: str, err: BaseException) -> str:
  return f"{prog}: error: {err}"


def run_main(main: Callable[[Optional[Sequence[str]]], int], argv: Optional[Sequence[str]],
             prog: str, resume_hint: str = "") -> int:
  """`main(argv)` with `UsageError` -> exit 2 and `WorkError` -> exit 1, each as one line;
  Ctrl-C -> exit 130 with one line (and `resume_hint`: how to finish the work)."""
  try:
    with warnings.catch_warnings():
      warnings.showwarning = _one_line_warning(prog)
      return main(argv)
  except UsageError as e:
    print(error_line(prog, e) + " (see --help)", file=sys.stderr)
    return EXIT_USAGE
  except WorkError as e:
    print(error_line(prog, e), file=sys.stderr)
    return EXIT_FAILED
  except KeyboardInterrupt:
    print(f"{prog}: interrupted" + (f"; {resume_hint}" if resume_hint else ""), file=sys.stderr)
    return 130


def _one_line_warning(prog: str):
  def show(message, category, filename, lineno, file=None, line=None):
    text = " ".join(str(message).split())
    try:  # above a running progress bar, not through it
      from tqdm import tqdm
      tqdm.write(f"{prog}: warning: {text}", file=file or sys.stderr)
    except ImportError:
      print(f"{prog}: warning: {text}", file=file or sys.stderr)
  return show


def write_atomic(path: str, write: Callable[[str], Any]) -> None:
  """`write(tmp)` then rename onto `path`: an interrupted run never leaves a
  half-written result under its name (only `<path>.partial`, removed on
  failure).  `write` may make a file or a folder; a folder already at `path`
  is swapped out and removed, so the result is the old one or the new one,
  never a mix.  Writers that pick a format by file name must be told it."""
  import shutil

  def remove(p):
    if os.path.isdir(p) and not os.path.islink(p):
      shutil.rmtree(p)
    elif os.path.lexists(p):
      os.remove(p)
  os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
  tmp, old = path + ".partial", f"{path}.old-{os.getpid()}"
  remove(tmp)
  try:
    write(tmp)
    if os.path.isdir(tmp) and os.path.isdir(path):
      os.replace(path, old)  # os.replace cannot replace a non-empty folder
    os.replace(tmp, path)
  finally:
    remove(tmp)
    remove(old)


# --- shared options of the AoP-SAM apps (label, export) -----------------------


def add_bundle_arguments(p: argparse.ArgumentParser) -> None:
  """--bundle, --checkpoint, --asf, as `segment` reads them (`segment.load_aop`)."""
  p.add_argument("--bundle", default=None,
                 help="AoP-SAM bundle dir (default: the shipped image-only predictor, valid for "
                      "every SAM; its own SAM is random-init); --checkpoint replaces its SAM")
  p.add_argument("--checkpoint", default=None,
                 help="SAM weights replacing the bundle's: an official .pth (any size), a "
                      "converted .safetensors, a Hugging Face SamModel folder, or a name "
                      "(vit_b, vit_l, vit_h, facebook/sam-vit-*; downloaded once, cached)")
  p.add_argument("--force-encoder", action="store_true",
                 help="run a bundle whose predictor reads SAM's embedding with a SAM it was not "
                      "trained with (refused otherwise)")
  p.add_argument("--asf", action="append", default=[], metavar="FIELD=VALUE",
                 help="change a field of the bundle's ASF config (repeatable), e.g. "
                      "--asf pred_iou_thresh=0.8; random-init SAMs get permissive mask filters")


def check_bundle_arguments(args) -> None:
  """Path and --asf mistakes as `UsageError`, before any model work; sets
  `args.asf_overrides` (what `segment.load_aop` reads)."""
  import os
  if args.bundle is not None and not os.path.isfile(os.path.join(args.bundle, "bundle.json")):
    raise UsageError(f"--bundle {args.bundle}: not an AoP-SAM bundle folder (no bundle.json)")
  from aopsam_jax.sam.config import CHECKPOINT_NAMES
  if args.checkpoint is not None and not os.path.exists(args.checkpoint) \
      and args.checkpoint not in CHECKPOINT_NAMES:
    raise UsageError(f"--checkpoint {args.checkpoint}: no such file or directory, nor a "
                     f"checkpoint name ({', '.join(CHECKPOINT_NAMES)})")
  args.asf_overrides = {}
  if args.asf:
    import dataclasses
    from aopsam_jax.aop.asf import AsfConfig
    from aopsam_jax.aop.bundle import parse_overrides
    try:
      args.asf_overrides = parse_overrides(args.asf, "--asf")
    except ValueError as e:
      raise UsageError(str(e)) from None
    unknown = sorted(set(args.asf_overrides) - {f.name for f in dataclasses.fields(AsfConfig)})
    if unknown:
      raise UsageError(f"--asf: unknown AsfConfig field(s) {unknown}")


def add_distributed_arguments(p: argparse.ArgumentParser) -> None:
  """The multi-process flags of `train`, same names and meaning."""
  g = p.add_argument_group("multi-process (every host runs the same command)")
  g.add_argument("--multihost", action="store_true",
                 help="call jax.distributed.initialize() (auto-detects TPU pods / SLURM)")
  g.add_argument("--coordinator_address", default=None, metavar="HOST:PORT",
                 help="address of process 0 (explicit multi-process)")
  g.add_argument("--num_processes", type=int, default=None,
                 help="number of processes (with --coordinator_address)")
  g.add_argument("--process_id", type=int, default=None,
                 help="this process, 0..N-1 (with --coordinator_address)")


def check_distributed_arguments(args) -> None:
  explicit = (args.coordinator_address, args.num_processes, args.process_id)
  if all(v is None for v in explicit):
    return
  if any(v is None for v in explicit):
    raise UsageError("--coordinator_address, --num_processes and --process_id go together")
  if args.multihost:
    raise UsageError("--multihost detects the processes itself: drop --coordinator_address etc.")
  if args.num_processes < 1 or not 0 <= args.process_id < args.num_processes:
    raise UsageError(f"--process_id must be in 0..{args.num_processes - 1}")


def init_distributed(args) -> None:
  """jax.distributed.initialize() as the flags ask (before any other JAX call)."""
  import jax
  if args.multihost:
    jax.distributed.initialize()
  elif args.coordinator_address is not None:
    jax.distributed.initialize(coordinator_address=args.coordinator_address,
                               num_processes=args.num_processes, process_id=args.process_id)


def barrier(name: str, timeout_s: int = 7 * 24 * 3600) -> None:
  """Every process waits here until all arrive (no-op with one process).

  The coordination service's barrier, not `multihost_utils.sync_global_devices`:
  that one is a collective whose CPU (gloo) set-up gives up when processes
  arrive more than 30 s apart, and processes finishing their shares of a
  dataset can be hours apart.  The client is not public API; orbax's barriers
  reach it the same way.
  """
  import jax
  if jax.process_count() == 1:
    return
  from jax._src import distributed
  distributed.global_state.client.wait_at_barrier(name, timeout_in_ms=int(timeout_s * 1000))
