"""Reports written beside every output: `report.json` (versioned schema) and a readable `report.md`."""

from __future__ import annotations

import json
import platform
import resource
import sys
from pathlib import Path


def peak_rss_mb() -> float:
    """Peak resident memory of this process so far, in MiB: the kernel's VmHWM where there is one (Linux), else
    getrusage's ru_maxrss. Not ru_maxrss on Linux: it survives exec, so a process started by a large parent
    reports at least the parent's size at the fork (a benchmark that had loaded two models saw its children
    all report its 2.5 GB)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def environment() -> dict:
    import torch

    from malleable import __version__

    return {"malleable": __version__, "python": sys.version.split()[0], "torch": torch.__version__,
            "platform": platform.platform(), "machine": platform.machine()}


def run_fields(steps: list[dict], done: int, device, start: float, out: Path) -> dict:
    """A stream report's fields about the run itself (continual's two streams): its steps (each with its
    `seconds`), the step it resumed after, times (`start` from time.perf_counter), memory, the machine."""
    import time

    return {"steps": steps, "resumed_from_step": done or None,
            "train_seconds": round(sum(s["seconds"] for s in steps), 2), "device": str(device),
            "wall_time_s": round(time.perf_counter() - start, 1), "peak_rss_mb": peak_rss_mb(),
            "environment": environment(), "output": {"path": str(out)}}


def write_report(directory: Path, report: dict, markdown: str) -> None:
    (directory / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (directory / "report.md").write_text(markdown)


def trusted(recipe) -> dict:
    """What the recipe allowed beyond plain files, for the report: both are off unless the user turned them on."""
    return {"trust_remote_code": bool(getattr(recipe, "trust_remote_code", False)),
            "allow_pickle": bool(getattr(recipe, "allow_pickle", False))}


def trusted_lines(flags: dict) -> list[str]:
    """report.md lines saying loudly what was allowed (nothing when nothing was)."""
    words = {"trust_remote_code": "code shipped inside the model folder was allowed to run",
             "allow_pickle": "pickle weight files were allowed (loaded with weights_only=True)"}
    return [f"- **{k}: on**: {words[k]}" for k, on in flags.items() if on]
