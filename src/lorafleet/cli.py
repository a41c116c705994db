"""`lorafleet` command line: thin entry points over the public API."""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import signal
import sys
import threading
from pathlib import Path


THREADS_HELP = ("torch intra-op threads; 0 = torch's default (one per core). Default: 1 for the built-in "
                "bases, whose layers are too small to split (bench/bench_threads.py, 2 cores: as fast as "
                "torch's default when idle, 2.1x faster beside one busy process), torch's default for a "
                "model directory")


def _threads(args, builtin_base: bool) -> None:
    """Set torch's threads before the model is built. Tiny layers make every op an OpenMP barrier,
    and with a neighbour process on the machine the waiting threads spin through its time slices."""
    n = args.threads
    if n is None:
        n = 1 if builtin_base else 0
    if n < 0:
        raise ValueError(f"--threads must be >= 0 (0: torch's default), got {n}")
    if n:
        import torch

        torch.set_num_threads(n)


def _job(args) -> int:
    """`train` and `rl`: load the YAML, run the job (its errors are ValueErrors). Ctrl-C or SIGTERM
    ends in one line saying where the run stopped and the command that continues it."""
    with _StopSignals() as stop:
        try:
            if args.command == "rl":
                from .jobs.rl import RLJob as Job, load_rl_config as load
            else:
                from .jobs.config import load_config as load
                from .jobs.train import TrainJob as Job

            cfg = load(args.config)
            _threads(args, builtin_base=cfg.base.path is None)
            if args.run_dir:
                cfg.run_dir = args.run_dir
            stop.job = Job(cfg, resume=args.resume, progress=False if args.no_progress else None)
            stop.job.run()
        except KeyboardInterrupt:
            if getattr(stop.job, "writes", True):  # under torchrun, only rank 0 speaks
                print(_stopped_line(args, stop.job, stop.signum), file=sys.stderr)
            return 128 + (stop.signum or signal.SIGINT)
    return 0


class _StopSignals:
    """SIGINT (Ctrl-C) and SIGTERM while the job steps: it finishes the step, writes a checkpoint
    and stops (so nothing is lost); a second signal, or one while the base loads or the summary
    is computed, stops at once (KeyboardInterrupt)."""

    def __init__(self):
        self.job, self.signum, self.previous = None, None, {}

    def _handle(self, signum, frame):
        first = self.signum is None
        self.signum = self.signum or signum
        if first and self.job is not None and self.job.phase == "steps":
            self.job.stop_requested = True
        else:
            raise KeyboardInterrupt

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():  # signal handlers live there only
            self.previous = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)


def _stopped_line(args, job, signum) -> str:
    """`lorafleet train: interrupted (Ctrl-C) at global step 7, checkpoint saved; resume with: ...`"""
    how = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
    if job is None:  # still importing or reading the YAML
        where, resumable = "before training started", args.resume
    else:
        where, resumable = job.stop_point(), job.last_checkpoint is not None
    # the user's own words, minus any --resume (argparse also takes a prefix such as --res)
    words = [w for w in args.argv if not (len(w) > 3 and "--resume".startswith(w))]
    command = shlex.join([_program(), *words] + (["--resume"] if resumable else []))
    verb = "resume with" if resumable else "start it again with"
    return f"lorafleet {args.command}: interrupted ({how}) {where}; {verb}: {command}"


def _program() -> str:
    """`lorafleet`, or the path it was started by when that is not the `lorafleet` on PATH."""
    argv0 = Path(sys.argv[0])
    on_path = shutil.which("lorafleet")
    if argv0.name != "lorafleet" or (on_path and Path(on_path).resolve() == argv0.resolve()):
        return "lorafleet"
    return sys.argv[0]


def _plot(args) -> int:
    from .jobs.outputs import plot_run

    print(plot_run(args.run_dir, args.out))
    return 0


# `serve --parallelism.NAME V`: torchtitan's spelling of the `parallelism:` mapping of a train YAML
PARALLELISM_FLAGS = {
    "data_parallel_replicate_degree": (int, "replicas of the model (default -1: the rest of the world)"),
    "data_parallel_shard_degree": (int, "ranks the frozen base is split over by FSDP2 (default 1)"),
    "expert_parallel_degree": (int, "ranks the experts and their LoRA are split over (default 1)"),
    "timeout_s": (float, "seconds before a dead or stuck rank fails the engine (default 300)")}


# `serve` limits: (type, default, help); the defaults are ServiceConfig's (tests/test_service_hardening.py checks)
SERVE_LIMITS = {
    "max_body_bytes": (int, 64 * 1024 * 1024, "request bodies over this answer 413 (zstd bodies: decompressed)"),
    "max_samples": (int, 128, "most num_samples of one sample request"),
    "max_sample_tokens": (int, 4096, "most max_tokens of one sample request"),
    "max_tokens_per_datum": (int, 32768, "most tokens of one forward_backward datum"),
    "session_timeout_s": (float, 300.0, "a session without heartbeats this long is finished (0: never)"),
    "slot_wait_s": (float, 60.0, "a sample waits this long for an adapter slot for its weights, then fails"),
    "health_stall_s": (float, 600.0, "healthz answers 503 once the scheduler shows no life this long"),
    "shutdown_grace_s": (float, 30.0, "SIGTERM: seconds for open requests, then for queued and running work"),
    "header_timeout_s": (float, 30.0, "a connection whose request headers take longer is dropped"),
    "max_prompt_tokens": (int, 32768, "most tokens of one sample request's prompt"),
    "memory_limit_mb": (int, 0, "memory the server may use (MiB; 0: 80%% of the machine's, or the GPU's): each "
                        "step's cost is estimated from the model, a batch over it is cut into micro-batches, a "
                        "datum, sample or job batch that cannot fit answers 400"),
    "max_slots_per_tenant": (int, 0, "adapter slots one tenant may hold: training clients + running jobs (0: all)"),
    "max_sessions_per_tenant": (int, 256, "open sessions per tenant (0: no limit); over it: 429"),
    "max_jobs_per_tenant": (int, 64, "queued + running jobs per tenant (0: no limit); over it: 429"),
    "max_queued_per_tenant": (int, 1024, "accepted, unfinished requests per tenant (0: no limit); over it: 429"),
    "decode_chunk_tokens": (int, 32, "decode steps a running sample takes per scheduler cycle before other work "
                            "runs (0: each sample decodes to its end at once, the old behaviour)"),
    "fair_share_tokens": (int, 4096, "tokens of work (fairness.py's prices) each tenant with work gets per "
                          "scheduler cycle (deficit round-robin)"),
    "max_step_tokens": (int, -1, "a forward_backward priced over this many tokens (as --fair-share-tokens counts) "
                        "runs as micro-batches of whole datums in successive cycles, other tenants' work between "
                        "them (-1: the fair share; 0: in one cycle, the old behaviour)"),
}
SERVE_MINIMUM = {"decode_chunk_tokens": 0, "fair_share_tokens": 1, "max_step_tokens": -1}  # checked before the base loads


def _check_serve_limits(args) -> None:
    for name, low in SERVE_MINIMUM.items():
        if getattr(args, name) < low:
            raise ValueError(f"--{name.replace('_', '-')} must be >= {low}, got {getattr(args, name)}")


def _serve(args) -> int:
    _check_serve_limits(args)
    if args.rollout_url:  # before the base loads
        from .service.rollout_sampling import check_rollout_flags

        check_rollout_flags(args.rollout_url, args.rollout_engine, args.max_rank, args.rollout_max_rank,
                            args.rollout_retries)
    _threads(args, builtin_base=args.base is None or not Path(args.base).is_dir())
    kwargs = dict(host=args.host, port=args.port, data_dir=args.data_dir, base=args.base, api_keys=args.api_keys,
                  max_adapters=args.max_adapters, max_rank=args.max_rank, aliases=args.alias,
                  dataset_roots=args.dataset_root, store=args.store,
                  cross_tenant_batching=not args.one_tenant_per_step,
                  rollout_url=args.rollout_url, rollout_engine=args.rollout_engine,
                  rollout_max_rank=args.rollout_max_rank, rollout_retries=args.rollout_retries,
                  **{k: getattr(args, k) for k in SERVE_LIMITS})
    parallelism = {k: v for k in PARALLELISM_FLAGS if (v := getattr(args, "parallelism." + k)) is not None}
    if parallelism or int(os.environ.get("WORLD_SIZE", "1")) > 1:  # torchrun: rank 0 serves, the others follow
        if args.rollout_url:
            raise ValueError("--rollout-url does not run under --parallelism / torchrun yet")
        from .service.ranks import serve_on_ranks

        return serve_on_ranks(parallelism or None, **kwargs)
    from .service.server import serve

    serve(**kwargs)
    return 0


def _jobs(args) -> int:
    """submit / status / cancel / download: a thin client of a running `lorafleet serve`."""
    import json

    from .client import JobClient, format_jobs

    c = JobClient(args.url, args.api_key)
    if args.command == "submit":
        j = c.submit(args.job_file, server_paths=args.server_paths)
        print(f"submitted {j['job_id']} ({j['name']}, {j['total_steps']} steps): {j['status']}")
    elif args.command == "status" and args.job_id is None:
        print(format_jobs(c.list()))
    elif args.command == "status":
        j = c.status(args.job_id)
        if args.json:
            print(json.dumps(j, indent=1))
        else:
            metrics = j.pop("metrics")
            print(format_jobs([dict(j, last_loss=next((m["loss"] for m in reversed(metrics) if "loss" in m), None))]))
            if j["error"]:
                print(f"error: {j['error']}")
            for m in metrics[-args.last:]:
                print("  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                       for k, v in m.items() if k != "time"))
    elif args.command == "cancel":
        print(f"{args.job_id}: {c.cancel(args.job_id)['status']}")
    else:
        print(c.download(args.job_id, args.out))
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="lorafleet", description="Train many LoRA adapters on one frozen base model.")
    sub = ap.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="train every adapter of a YAML config concurrently")
    r = sub.add_parser("rl", help="RL-train several policies, each with its own reward, at once")
    for cmd, example in ((t, "quickstart.yaml"), (r, "rl_quickstart.yaml")):
        cmd.add_argument("config", help=f"the job's YAML file (see examples/{example})")
        cmd.add_argument("--resume", action="store_true", help="continue from the run's last checkpoint")
        cmd.add_argument("--run-dir", help="override the YAML's run_dir")
        cmd.add_argument("--no-progress", action="store_true", help="log lines instead of progress bars")
        cmd.add_argument("--threads", type=int, help=THREADS_HELP)
        cmd.set_defaults(fn=_job)
    p = sub.add_parser("plot", help="write the PNG of a run's loss curves")
    p.add_argument("run_dir")
    p.add_argument("--out", help="PNG path (default: RUN_DIR/loss_curves.png)")
    p.set_defaults(fn=_plot)
    s = sub.add_parser("serve", help="run the Tinker-compatible HTTP service (needs the 'serve' extra)")
    s.add_argument("--host", default="127.0.0.1")
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--data-dir", default="lorafleet-data", help="checkpoints and the tokenizer live here")
    s.add_argument("--base", help="a Hugging Face model directory, a debug arch, or debug:<arch>-qwenvocab (the Qwen "
                   "vocabulary and an offline Qwen tokenizer) (default: lorafleet:qwen3_moe-copy, the train quickstart's "
                   "pretrained base; debug:<arch> for a random-init one)")
    s.add_argument("--api-keys", help="file of tenant:key lines (or JSON); also read: $LORAFLEET_API_KEYS")
    s.add_argument("--max-adapters", type=int, default=16, help="slots: training models + loaded samplers")
    s.add_argument("--max-rank", type=int, default=64)
    s.add_argument("--alias", action="append", default=[], help="another base_model name to accept (repeatable)")
    s.add_argument("--threads", type=int, help=THREADS_HELP)
    s.add_argument("--dataset-root", action="append", default=[],
                   help="a directory jobs may read server-side datasets from (repeatable; default: none)")
    s.add_argument("--store", choices=("sqlite", "memory"), default="sqlite",
                   help="where sessions, jobs and metrics live (default: DATA_DIR/lorafleet.db)")
    s.add_argument("--one-tenant-per-step", action="store_true",
                   help="turn cross-tenant batching off (time-sharing; only for comparisons, see bench/)")
    for name, (type_, default, help_) in SERVE_LIMITS.items():
        s.add_argument("--" + name.replace("_", "-"), type=type_, default=default, metavar="S" if type_ is float else "N",
                       help=f"{help_} (default: {default})")
    for name, (type_, help_) in PARALLELISM_FLAGS.items():  # under torchrun, see docs/distributed.md
        s.add_argument(f"--parallelism.{name}", type=type_, metavar="S" if type_ is float else "N", help=help_)
    s.add_argument("--rollout-url", default="", metavar="URL",
                   help="sample through this running vLLM / SGLang server (same base, --enable-lora) instead of "
                        "the built-in decoder: sampler weights are pushed into it (docs/rollout.md)")
    s.add_argument("--rollout-engine", choices=("vllm", "sglang"), default="vllm", help="what --rollout-url runs")
    s.add_argument("--rollout-max-rank", type=int, default=0, metavar="N",
                   help="the engine's --max-lora-rank (default 0: this server's --max-rank)")
    s.add_argument("--rollout-retries", type=int, default=2, metavar="N",
                   help="tries after the first of each call to the engine (default 2)")
    s.set_defaults(fn=_serve)
    jobs = {"submit": "submit an adapter job to a running `lorafleet serve`",
            "status": "list your jobs, or show one job's status and metrics",
            "cancel": "cancel a queued or running job",
            "download": "download a finished job's PEFT adapter as a .tar.gz"}
    for name, help_ in jobs.items():
        j = sub.add_parser(name, help=help_)
        if name == "submit":
            j.add_argument("job_file", help="YAML: one adapter's fields of a train config (see examples/job_rev.yaml)")
            j.add_argument("--server-paths", action="store_true",
                           help="send data paths for the server to read instead of uploading the files")
        else:
            j.add_argument("job_id", nargs="?" if name == "status" else None)
        if name == "status":
            j.add_argument("--json", action="store_true", help="the whole record with every metric, as JSON")
            j.add_argument("--last", type=int, default=5, help="metric records to show (default 5)")
        if name == "download":
            j.add_argument("-o", "--out", help="archive path (default: <job_id>.tar.gz)")
        j.add_argument("--url", help="the server (default: $LORAFLEET_URL or http://127.0.0.1:8000)")
        j.add_argument("--api-key", help="your key (default: $LORAFLEET_API_KEY)")
        j.set_defaults(fn=_jobs)
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the command that resumes a job
    try:
        return args.fn(args)
    except ValueError as e:  # user errors: one clear line, no traceback
        print(f"lorafleet {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
