"""How many torch threads should `lorafleet train` use on a small CPU machine? Measured, not guessed.

Runs the quickstart job (cut to ``--steps`` steps per adapter, the base warm in the cache) as the
user runs it, ``lorafleet train ... --threads N``, for every N in ``--threads-list`` (0 = torch's own
choice, one thread per core), once on the machine as it is ("idle") and once with ``--busy`` other
processes each spinning a core ("busy": what a shared CI box or a laptop running anything else
looks like). Prints wall seconds per run and each setting's ratio to the best one, side by side::

    .venv/bin/python bench/bench_threads.py                # full table (a few minutes on 2 cores)
    .venv/bin/python bench/bench_threads.py --steps 10     # quicker

Why it matters: torch's OpenMP threads spin at every barrier; on a tiny model every op is a
barrier, so when one of N threads is descheduled by another process the other N-1 spin for its
whole time slice. The loss is largest exactly where lorafleet's default model runs: small layers.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _spin(stop):  # a busy neighbour: one core at 100 % until told to stop
    while not stop.is_set():
        sum(range(10_000))


def _config(tmp: Path, steps: int) -> Path:
    cfg = yaml.safe_load((ROOT / "examples" / "quickstart.yaml").read_text())
    for a in cfg["adapters"]:
        a["max_steps"], a["eval_every"] = steps, 10 * steps
        for k in ("data", "eval_data"):
            a[k] = str(ROOT / "examples" / a[k])
    cfg["checkpoint_every"] = 0
    path = tmp / "bench_threads.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _run(cfg: Path, run_dir: Path, threads: int) -> float:
    cmd = [sys.executable, "-m", "lorafleet.cli", "train", str(cfg), "--run-dir", str(run_dir),
           "--no-progress", "--threads", str(threads)]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=25, help="steps per adapter (quickstart: 200)")
    ap.add_argument("--threads-list", default="1,0", help="comma list; 0 = torch's default")
    ap.add_argument("--busy", type=int, default=1, help="spinning neighbour processes in the busy run")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args()
    settings = [int(t) for t in args.threads_list.split(",")]
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        cfg = _config(tmp, args.steps)
        _run(cfg, tmp / "warm", 1)  # builds / loads the cached base; not timed
        rows = {}
        for load in ("idle", "busy"):
            stop = mp.Event()
            spinners = [mp.Process(target=_spin, args=(stop,), daemon=True) for _ in range(args.busy if load == "busy" else 0)]
            for p in spinners:
                p.start()
            try:
                for t in settings:
                    times = [_run(cfg, tmp / f"{load}-{t}-{i}", t) for i in range(args.repeats)]
                    rows[(load, t)] = min(times)
            finally:
                stop.set()
                for p in spinners:
                    p.join()
    print(f"cores: {os.cpu_count()}  loadavg at end: {os.getloadavg()[0]:.2f}  steps/adapter: {args.steps}  "
          f"(wall seconds of the whole `lorafleet train` process, best of {args.repeats})")
    print(f"{'threads':>10} {'idle s':>8} {'busy s':>8} {'idle/best':>10} {'busy/best':>10}")
    best = {load: min(v for (l, _), v in rows.items() if l == load) for load in ("idle", "busy")}
    for t in settings:
        name = "default" if t == 0 else str(t)
        i, b = rows[("idle", t)], rows[("busy", t)]
        print(f"{name:>10} {i:8.1f} {b:8.1f} {i / best['idle']:10.2f} {b / best['busy']:10.2f}")


if __name__ == "__main__":
    main()
