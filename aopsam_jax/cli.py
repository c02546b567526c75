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
"""

from __future__ import annotations

import argparse
import sys
from typing import Callable, Optional, Sequence

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
             prog: str) -> int:
  """`main(argv)` with `UsageError` -> exit 2 and `WorkError` -> exit 1, each as one line."""
  try:
    return main(argv)
  except UsageError as e:
    print(error_line(prog, e) + " (see --help)", file=sys.stderr)
    return EXIT_USAGE
  except WorkError as e:
    print(error_line(prog, e), file=sys.stderr)
    return EXIT_FAILED
  except KeyboardInterrupt:
    print(f"{prog}: interrupted", file=sys.stderr)
    return 130
