"""Process facts for benchmarks and reports."""

from __future__ import annotations

import platform
import resource
import sys


def peak_rss_kb() -> int:
  """This process' resident-memory high-water mark in KiB.

  Linux keeps `ru_maxrss` across fork + exec, so a child process started by a
  big parent (pytest, a benchmark driver) reports at least the parent's peak.
  `VmHWM` in /proc/self/status belongs to the current program image only;
  `ru_maxrss` is the fallback where /proc is absent (it counts bytes on
  macOS, KiB elsewhere).
  """
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("VmHWM:"):
          return int(line.split()[1])
  except OSError:
    pass
  peak = int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
  return peak // 1024 if sys.platform == "darwin" else peak


def cpu_model() -> str:
  """The processor's marketing name (from /proc/cpuinfo where present), for benchmark tables."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()
