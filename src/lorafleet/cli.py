"""`lorafleet` command line: thin entry points over the public API."""

from __future__ import annotations

import argparse
import sys


def _train(args) -> int:
    from .jobs.config import load_config
    from .jobs.train import TrainJob

    cfg = load_config(args.config)
    if args.run_dir:
        cfg.run_dir = args.run_dir
    TrainJob(cfg, resume=args.resume, progress=False if args.no_progress else None).run()
    return 0


def _rl(args) -> int:
    from .jobs.rl import RLJob, load_rl_config

    cfg = load_rl_config(args.config)
    if args.run_dir:
        cfg.run_dir = args.run_dir
    RLJob(cfg, resume=args.resume, progress=False if args.no_progress else None).run()
    return 0


def _plot(args) -> int:
    from .jobs.outputs import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lorafleet", description="Train many LoRA adapters on one frozen base model.")
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train every adapter of a YAML config concurrently")
    t.add_argument("config", help="the job's YAML file (see examples/quickstart.yaml)")
    t.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    t.add_argument("--run-dir", help="override the YAML's run_dir")
    t.add_argument("--no-progress", action="store_true", help="log lines instead of progress bars")
    t.set_defaults(fn=_train)
    r = sub.add_parser("rl", help="RL-train several policies, each with its own reward, at once")
    r.add_argument("config", help="the job's YAML file (see examples/rl_quickstart.yaml)")
    r.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
    r.add_argument("--run-dir", help="override the YAML's run_dir")
    r.add_argument("--no-progress", action="store_true", help="log lines instead of progress bars")
    r.set_defaults(fn=_rl)
    p = sub.add_parser("plot", help="write the PNG of a run's loss curves")
    p.add_argument("run_dir")
    p.add_argument("--out", help="PNG path (default: RUN_DIR/loss_curves.png)")
    p.set_defaults(fn=_plot)
    args = ap.parse_args(argv)
    try:
        return args.fn(args)
    except ValueError as e:  # user errors: one clear line, no traceback
        print(f"lorafleet {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
