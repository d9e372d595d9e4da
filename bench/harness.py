"""Shared benchmark harness (DESIGN.md §9, STYLE.md "Benchmarks are data").

Usage in a ``bench/bench_<op>.py``::

    run = BenchRun("kernels", quick=True)
    stats = run.time(lambda: op(x), device=x.device)
    run.record(op="mask_pool", backend="triton", dtype="bf16", shape={...}, stats=stats,
               bytes_moved=nbytes, baseline=eager_stats)
    run.finish()   # writes the markdown summary of this run

Every call of :meth:`BenchRun.record` appends one JSON line to ``bench/results/<bench>.jsonl`` at
once, so a run cut short keeps what it measured. Warm-up iterations are excluded; the row holds the
median and p20/p80 of the timed iterations, peak memory, GB/s (and its share of the device's
measured copy bandwidth) or TFLOP/s, and the speed ratio to the baseline measured in the same run.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Stats:
    median_ms: float
    p20_ms: float
    p80_ms: float
    iters: int
    peak_mem_mb: float | None  # CUDA peak allocated during the timed calls; None on CPU


def _quantile(sorted_vals: list[float], q: float) -> float:
    if len(sorted_vals) == 1:
        return sorted_vals[0]
    pos = q * (len(sorted_vals) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_vals) - 1)
    return sorted_vals[lo] + (sorted_vals[hi] - sorted_vals[lo]) * (pos - lo)


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu:{platform.processor() or platform.machine()} x{os.cpu_count()}"


def git_revision() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5, cwd=RESULTS_DIR.parent
        )
        rev = out.stdout.strip() or "unknown"
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=5,
            cwd=RESULTS_DIR.parent,
        ).stdout.strip()
        return rev + ("-dirty" if dirty else "")
    except Exception:
        return "unknown"


def versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__}
    try:
        import triton

        v["triton"] = triton.__version__
    except Exception:
        v["triton"] = None
    v["cuda"] = torch.version.cuda
    return v


def time_fn(
    fn: Callable[[], object], *, device: torch.device, warmup: int = 5, iters: int = 30, min_time_s: float = 0.0
) -> Stats:
    """Time ``fn()``: ``warmup`` untimed calls, then ``iters`` timed calls (more while under ``min_time_s``)."""
    is_cuda = device.type == "cuda"
    for _ in range(warmup):
        fn()
    if is_cuda:
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    times: list[float] = []
    t_start = time.perf_counter()
    while len(times) < iters or (time.perf_counter() - t_start) < min_time_s:
        if is_cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        if len(times) >= 10 * max(iters, 1):
            break
    times.sort()
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if is_cuda else None
    return Stats(statistics.median(times), _quantile(times, 0.2), _quantile(times, 0.8), len(times), peak)


def measure_copy_bandwidth(device: torch.device, nbytes: int | None = None) -> float:
    """Measured device-to-device copy bandwidth in GB/s (read + write counted), the roofline for memory-bound ops."""
    if nbytes is None:
        nbytes = (1 << 30) if device.type == "cuda" else (1 << 27)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    stats = time_fn(lambda: dst.copy_(src), device=device, warmup=3, iters=20)
    return 2 * nbytes / (stats.median_ms * 1e-3) / 1e9


class BenchRun:
    """One benchmark run: a device, versions, a git revision, and rows appended as they are measured."""

    def __init__(
        self,
        bench: str,
        *,
        device: torch.device | str | None = None,
        quick: bool = False,
        results_dir: Path | str = RESULTS_DIR,
    ):
        if device is None:
            device = "cuda" if torch.cuda.is_available() else "cpu"
        self.device = torch.device(device)
        self.bench = bench
        self.quick = quick
        self.results_dir = Path(results_dir)
        self.results_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.results_dir / f"{bench}.jsonl"
        self.started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        self.meta = {
            "bench": bench,
            "device": device_name(self.device),
            "device_type": self.device.type,
            "git": git_revision(),
            "run_started": self.started,
            "quick": quick,
            **versions(),
        }
        self._peak_bw: float | None = None
        self.rows: list[dict] = []

    @property
    def peak_bandwidth_gbs(self) -> float:
        if self._peak_bw is None:
            self._peak_bw = measure_copy_bandwidth(self.device)
        return self._peak_bw

    def time(self, fn: Callable[[], object], **kw) -> Stats:
        kw.setdefault("device", self.device)
        if self.quick:
            kw.setdefault("warmup", 2)
            kw.setdefault("iters", 5)
        return time_fn(fn, **kw)

    def record(
        self,
        *,
        op: str,
        backend: str,
        dtype: str,
        shape: dict,
        stats: Stats | None,
        bytes_moved: int | None = None,
        flops: float | None = None,
        baseline: Stats | None = None,
        baseline_name: str = "torch_eager",
        note: str = "",
        extra: dict | None = None,
    ) -> dict:
        """Append one row. ``stats=None`` records a backend that could not run, with ``note`` saying why.

        Triton on CPU tensors runs in the interpreter: its time is recorded, but no GB/s and no speed-up, since
        an interpreted kernel's speed says nothing about the kernel.
        """
        interpreted = backend == "triton" and self.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1"
        if interpreted:
            bytes_moved = flops = baseline = None
            if "interpreter" not in note:
                note = ("triton interpreter (CPU), not a speed measurement; " + note).rstrip("; ")
        row = {**self.meta, "op": op, "backend": backend, "dtype": dtype, "shape": shape, "note": note}
        if stats is not None:
            row.update(asdict(stats))
            sec = stats.median_ms * 1e-3
            if bytes_moved is not None:
                row["gb_s"] = bytes_moved / sec / 1e9
                row["peak_copy_gb_s"] = self.peak_bandwidth_gbs
                row["frac_of_peak_bw"] = row["gb_s"] / self.peak_bandwidth_gbs
            if flops is not None:
                row["tflop_s"] = flops / sec / 1e12
            if baseline is not None:
                row["baseline"] = baseline_name
                row["speedup_vs_baseline"] = baseline.median_ms / stats.median_ms
        if extra:
            row.update(extra)
        with open(self.path, "a") as f:
            f.write(json.dumps(row, sort_keys=True) + "\n")
        self.rows.append(row)
        return row

    def finish(self) -> Path:
        """Write the markdown summary of this run next to the JSON lines; return its path."""
        slug = "".join(c if c.isalnum() else "-" for c in self.meta["device"]).strip("-").lower()
        md = self.results_dir / f"{self.bench}-{slug}{'-quick' if self.quick else ''}.md"
        lines = [
            f"# {self.bench} on {self.meta['device']}",
            "",
            f"git {self.meta['git']}, torch {self.meta['torch']}, triton {self.meta['triton']}, "
            f"run started {self.started}{', quick shapes' if self.quick else ''}. "
            f"Rows: `{self.path.name}`. Speed-up = baseline median / this median, same run.",
            "",
            "| op | backend | dtype | shape | median ms | p20–p80 ms | GB/s | % peak BW | TFLOP/s | speed-up | note |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in self.rows:
            shape = ", ".join(f"{k}={v}" for k, v in r["shape"].items())

            def f(key, fmt, r=r):
                return format(r[key], fmt) if r.get(key) is not None else ""

            pct = format(100 * r["frac_of_peak_bw"], ".0f") if r.get("frac_of_peak_bw") is not None else ""
            sp = f"{r['speedup_vs_baseline']:.2f}× vs {r['baseline']}" if r.get("speedup_vs_baseline") else ""
            p2080 = f"{r['p20_ms']:.3f}–{r['p80_ms']:.3f}" if "p20_ms" in r else ""
            lines.append(
                f"| {r['op']} | {r['backend']} | {r['dtype']} | {shape} | {f('median_ms', '.3f')} | {p2080} | "
                f"{f('gb_s', '.1f')} | {pct} | {f('tflop_s', '.2f')} | {sp} | {r['note']} |"
            )
        md.write_text("\n".join(lines) + "\n")
        return md
