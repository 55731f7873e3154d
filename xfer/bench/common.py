"""What every benchmark shares: timing whole processes, medians, the results file."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

Echo = Callable[[str], None] | None


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


def compile_bytecode() -> None:
    """Compile xfer's modules, as installing a wheel does, before timing whole processes.

    An editable install never writes bytecode where PYTHONDONTWRITEBYTECODE is set,
    and sources edited since setup would be compiled afresh in every process.
    """
    import compileall

    compileall.compile_dir(str(Path(__file__).resolve().parents[1]), quiet=2)


# Runs the command and reports its wall time and peak RSS. It runs in a small
# process of its own: a child forked straight from a big benchmark process
# starts with the parent's pages counted in its ru_maxrss (fork and vfork alike,
# until exec), so measured from here every command would look as big as the bench.
_MEASURE = """
import json, os, subprocess, sys, time
t = time.perf_counter()
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(p.pid, 0)
print(json.dumps([time.perf_counter() - t, usage.ru_maxrss, os.waitstatus_to_exitcode(status)]))
"""


def run_process(argv: Sequence[str], **kwargs: Any) -> tuple[float, int]:
    """Run a command to completion; return (wall seconds, peak RSS in kB of that process)."""
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *argv], capture_output=True, text=True,
                          check=False, **kwargs)
    try:
        elapsed, peak_kb, code = json.loads(proc.stdout)
    except ValueError:
        raise RuntimeError(f"measuring {' '.join(argv)} failed: {proc.stderr.strip()}") from None
    if code != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({code}): {proc.stderr.strip()}")
    return float(elapsed), int(peak_kb)


def run_shell(script: str) -> float:
    """Wall seconds of a shell pipeline (the baseline tools are pipelines)."""
    started = time.perf_counter()
    subprocess.run(["sh", "-c", script], check=True, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)
    return time.perf_counter() - started


def machine() -> dict[str, Any]:
    return {"kernel": platform.release(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "maxrss_unit": "kB", "self_maxrss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}


def write_results(path: Path, result: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {**result, "machine": machine(), "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    path.write_text(json.dumps(result, indent=2) + "\n")
