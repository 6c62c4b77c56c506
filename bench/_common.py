"""Shared helpers for the benchmarks: machine description, timed subprocesses, result files."""

from __future__ import annotations

import datetime as _dt
import importlib.metadata as _md
import json
import os
import platform
import random
import shlex
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from malleable.io.atomic import write_text_atomic

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
REPO = BENCH_DIR.parent
GNU_TIME = "/usr/bin/time"


def _version(dist: str, python: str | None = None) -> str | None:
    if python is None:
        try:
            return _md.version(dist)
        except _md.PackageNotFoundError:
            return None
    try:
        out = subprocess.run([python, "-c", f"import importlib.metadata as m; print(m.version('{dist}'))"],
                             capture_output=True, text=True, timeout=120)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 1024 ** 2, 1)
    except OSError:
        pass
    return float("nan")


def git_revision() -> str | None:
    try:
        rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                             text=True, timeout=30).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(REPO), "status", "--porcelain", "--", "src"], capture_output=True,
                               text=True, timeout=30).stdout.strip()
        return (rev + ("+dirty-src" if dirty else "")) or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine(extra_versions: dict[str, str | None] | None = None) -> dict:
    return {
        "cpu": cpu_model(),
        "cores": os.cpu_count(),
        "ram_gib": ram_gib(),
        "os": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            "malleable": _version("malleable"),
            "torch": _version("torch"),
            "transformers": _version("transformers"),
            "safetensors": _version("safetensors"),
            "peft": _version("peft"),
            **(extra_versions or {}),
        },
        "malleable_git": git_revision(),
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }


def timed_run(cmd: list[str], *, cwd: str | Path | None = None, env: dict | None = None,
              log: Path | None = None, timeout: float | None = None) -> dict:
    """Run `cmd` under GNU time; return wall seconds (%e) and max RSS in MiB (%M).

    %M is ru_maxrss of the waited-for children: the peak resident set of the LARGEST single process in the
    tree (not the sum over processes). Resident file-backed pages (mmap'd safetensors) count towards it.
    """
    with tempfile.NamedTemporaryFile("r", suffix=".time", delete=False) as tf:
        tpath = tf.name
    full = [GNU_TIME, "-f", "%e %M", "-o", tpath, *cmd]
    t0 = time.perf_counter()
    out = subprocess.run(full, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    outer = time.perf_counter() - t0
    text = Path(tpath).read_text().strip().splitlines()
    os.unlink(tpath)
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        with open(log, "a") as f:
            f.write(f"$ {shlex.join(cmd)}\n[rc={out.returncode}]\n{out.stdout[-4000:]}\n{out.stderr[-8000:]}\n")
    res = {"cmd": shlex.join(cmd), "rc": out.returncode, "outer_wall_s": round(outer, 3)}
    last = text[-1].split() if text else []
    if out.returncode == 0 and len(last) == 2:
        res["wall_s"] = float(last[0])
        res["max_rss_mib"] = round(int(last[1]) / 1024, 1)
    else:
        res["stderr_tail"] = (out.stderr or "")[-3000:]
        res["stdout_tail"] = (out.stdout or "")[-1000:]
    return res


def thread_env(threads: int | None) -> dict | None:
    """Environment for a subprocess limited to `threads` intra-op threads (None: inherit, torch's default)."""
    if not threads:
        return None
    env = dict(os.environ)
    for k in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[k] = str(threads)
    return env


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


def median(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def boot_median(xs: list[float], resamples: int = 2000, seed: int = 0) -> list[float]:
    """95% bootstrap interval of the median of `xs` (percentile method, seeded)."""
    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choice(xs) for _ in xs) for _ in range(resamples))
    return [meds[int(0.025 * resamples)], meds[int(0.975 * resamples) - 1]]


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or b == 0:
        return None
    return a / b


def paired_t(before: list[float], after: list[float]) -> dict:
    """Mean of after - before over paired runs (seeds) with a 95% t interval (n - 1 degrees of freedom)."""
    import statistics

    from scipy.stats import t

    d = [a - b for b, a in zip(before, after)]
    mean = statistics.fmean(d)
    if len(d) < 2:
        return {"mean": mean, "lo": float("nan"), "hi": float("nan"), "n": len(d)}
    half = t.ppf(0.975, len(d) - 1) * statistics.stdev(d) / len(d) ** 0.5
    return {"mean": mean, "lo": mean - half, "hi": mean + half, "n": len(d)}


def fmt(x, nd: int = 2) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        if x != 0 and (abs(x) < 10 ** -nd or abs(x) >= 1e6):
            return f"{x:.2e}"
        return f"{x:.{nd}f}"
    return str(x)


def write_results(name: str, data: dict, markdown: str, results_dir: Path = RESULTS_DIR) -> tuple[Path, Path]:
    results_dir.mkdir(parents=True, exist_ok=True)
    j = results_dir / f"{name}.json"
    m = results_dir / f"{name}.md"
    write_text_atomic(j, json.dumps(data, indent=2, sort_keys=False) + "\n")
    write_text_atomic(m, markdown.rstrip() + "\n")
    return j, m


def drop_into_page_cache(paths: list[Path]) -> None:
    """Read every file once so that all timed runs start from the same (warm) page cache."""
    for p in paths:
        files = [p] if p.is_file() else sorted(x for x in p.rglob("*") if x.is_file())
        for f in files:
            with open(f, "rb") as fh:
                while fh.read(64 << 20):
                    pass
