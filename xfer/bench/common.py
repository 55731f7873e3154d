"""What every benchmark shares: timing whole processes, medians, the results file."""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
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


def run_process(argv: Sequence[str], **kwargs: Any) -> tuple[float, int]:
    """Run a command to completion; return (wall seconds, peak RSS in kB of that process).

    Uses wait4(2) so the peak memory is that one process's, not the largest child so far.
    """
    started = time.perf_counter()
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, **kwargs)
    _, status, usage = os.wait4(proc.pid, 0)
    elapsed = time.perf_counter() - started
    proc.returncode = os.waitstatus_to_exitcode(status)
    stderr = proc.stderr.read().decode() if proc.stderr else ""
    if proc.stderr:
        proc.stderr.close()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({proc.returncode}): {stderr.strip()}")
    return elapsed, usage.ru_maxrss


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
