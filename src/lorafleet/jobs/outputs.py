"""What a job writes besides checkpoints: per-adapter metrics (JSONL + TensorBoard), the PNG of
all adapters' curves, and live progress bars."""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

METRICS_FILE = "metrics.jsonl"


class MetricsLog:
    """``run_dir/<adapter>/metrics.jsonl`` plus TensorBoard events in ``run_dir/tb/<adapter>``.

    On resume from global step ``resume_step`` the JSONL keeps only records up to it and the
    TensorBoard writer purges later events, so a resumed run's logs equal an uninterrupted one's.
    """

    def __init__(self, run_dir: Path, name: str, resume_step: int | None = None):
        from tensorboardX import SummaryWriter

        self.dir = run_dir / name
        self.dir.mkdir(parents=True, exist_ok=True)
        self.path = self.dir / METRICS_FILE
        if resume_step is not None and self.path.exists():
            keep = [ln for ln in self.path.read_text().splitlines()
                    if ln.strip() and json.loads(ln).get("global_step", 0) <= resume_step]
            self.path.write_text("".join(ln + "\n" for ln in keep))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.tb = SummaryWriter(str(run_dir / "tb" / name),
                                purge_step=None if resume_step is None else resume_step + 1)

    def log(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        step = record.get("step", 0)
        for k, v in record.items():
            if k not in ("step", "global_step") and isinstance(v, (int, float)) and math.isfinite(v):
                self.tb.add_scalar(k, v, step)

    def close(self):
        self.tb.flush()
        self.tb.close()


def read_metrics(run_dir: Path) -> dict[str, list[dict]]:
    out = {}
    for f in sorted(Path(run_dir).glob(f"*/{METRICS_FILE}")):
        out[f.parent.name] = [json.loads(ln) for ln in f.read_text().splitlines() if ln.strip()]
    return out


# (metric, y label, log scale); each panel is drawn when some adapter logged that metric
PANELS = (("loss", "loss per trained token", True), ("eval_acc", "eval exact-match accuracy", False),
          ("reward", "mean reward", False), ("kl", "KL to base (per token)", False))


def plot_run(run_dir, out: Path | None = None) -> Path:
    """One PNG with a panel per logged metric (training loss with eval loss as dots, eval
    accuracy, reward, KL), every adapter a colour, per optimizer step."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    if not metrics:
        raise ValueError(f"{run_dir}: no */{METRICS_FILE} files to plot")
    panels = [p for p in PANELS if any(p[0] in r for recs in metrics.values() for r in recs)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4.5), squeeze=False)
    for ax, (key, label, log) in zip(axes[0], panels):
        for i, (name, recs) in enumerate(metrics.items()):
            color = f"C{i % 10}"
            pts = [(r["step"], r[key]) for r in recs if key in r and r[key] == r[key]]
            if pts:
                ax.plot(*zip(*pts), "-", color=color, label=name, markersize=3)
            if key == "loss":
                ev = [(r["step"], r["eval_loss"]) for r in recs if "eval_loss" in r]
                if ev:
                    ax.plot(*zip(*ev), "o--", color=color, label=f"{name} eval", markersize=3)
        ax.set_xlabel("optimizer step (per adapter)")
        ax.set_ylabel(label)
        if log:
            ax.set_yscale("log")
        if key == "eval_acc":
            ax.set_ylim(-0.02, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"lorafleet: {run_dir.name}")
    fig.tight_layout()
    out = out or run_dir / "loss_curves.png"
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


class Progress:
    """One tqdm bar per adapter on a terminal; plain log lines every ``every`` steps otherwise."""

    def __init__(self, enabled: bool | None = None, every: int = 10, stream=None):
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if enabled is None else enabled
        self.every = every
        self.bars: dict[str, object] = {}
        self.t0: dict[str, float] = {}

    def start(self, name: str, total: int, done: int = 0, position: int = 0):
        self.t0[name] = time.perf_counter()
        if self.tty:
            from tqdm import tqdm

            # leave=False: a finished bar clears itself; the job logs a finish line in its place
            self.bars[name] = tqdm(total=total, initial=done, desc=f"{name:>10s}", position=position,
                                   leave=False, file=self.stream, dynamic_ncols=True)

    def update(self, name: str, step: int, total: int, value: float, tok_s: float, label: str = "loss"):
        bar = self.bars.get(name)
        if bar is not None:
            bar.update(step - bar.n)
            bar.set_postfix_str(f"{label} {value:.4f} {tok_s:,.0f} tok/s")
        elif step % self.every == 0 or step == total:
            print(f"[{name}] step {step}/{total} {label} {value:.4f} {tok_s:,.0f} tok/s", file=self.stream, flush=True)

    def write(self, message: str) -> None:
        """Print a log line without tearing the live bars (tqdm clears and redraws them)."""
        if self.tty:  # tqdm also repositions the cursor after a bar that just cleared itself
            from tqdm import tqdm

            tqdm.write(message, file=self.stream)
        else:
            print(message, flush=True)

    def finish(self, name: str):
        bar = self.bars.pop(name, None)
        if bar is not None:
            bar.close()

    def close(self):
        for name in list(self.bars):
            self.finish(name)
