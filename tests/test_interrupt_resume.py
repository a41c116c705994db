"""Ctrl-C and SIGTERM of a real `lorafleet train|rl` process: one line saying where the run stopped
and the command that continues it (no traceback, exit 128 + the signal); that command finishes the
run bitwise identically to an uninterrupted one; a run stopped before its first checkpoint starts
again as its line says; `--resume` of a finished run does no step.

Kept fast: a tiny debug base without pretraining, one intra-op thread, and the reference runs
in-process (only the runs that get a signal, and the printed command of the train one, are processes)."""

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lorafleet.cli import main as cli_main
from lorafleet.jobs import train as train_mod
from lorafleet.jobs.config import load_config
from lorafleet.jobs.rl import RLJob, load_rl_config
from lorafleet.jobs.train import TrainJob

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
LORAFLEET = Path(sys.executable).with_name("lorafleet")  # the console script of this environment
QUIET = {"progress": False, "log": lambda *a: None}
needs_console_script = pytest.mark.skipif(not LORAFLEET.is_file(), reason=f"no {LORAFLEET} (pip install -e .)")


def _rows(path, name, n, start=0):
    rows = (EXAMPLES / "data" / name).read_text().splitlines()[start:start + n]
    path.write_text("".join(ln + "\n" for ln in rows))
    return path.name


def train_yaml(d: Path) -> Path:
    """Two adapters through one slot (sort queues behind rev, sort accumulates over 2 micro-steps):
    30 global steps, a checkpoint every 4."""
    d.mkdir(parents=True, exist_ok=True)
    adapters = [
        {"name": "rev", "data": _rows(d / "rev.jsonl", "rev_train.jsonl", 16), "rank": 2, "batch_size": 2,
         "eval_data": _rows(d / "rev_eval.jsonl", "rev_train.jsonl", 4, start=100), "max_steps": 14,
         "optimizer": {"lr": 1e-2}},
        {"name": "sort", "data": _rows(d / "sort.jsonl", "sort_train.jsonl", 16), "rank": 4, "batch_size": 2,
         "grad_accum": 2, "max_steps": 8, "seed": 1,
         "optimizer": {"lr": 1e-2, "schedule": "cosine", "warmup_steps": 1}},
    ]
    cfg = {"base": {"debug": "qwen3_moe"}, "run_dir": str(d / "run"), "max_adapters": 1, "max_rank": 4,
           "max_length": 16, "checkpoint_every": 4, "adapters": adapters}
    (d / "job.yaml").write_text(yaml.safe_dump(cfg))
    return d / "job.yaml"


def rl_yaml(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "rw.py").write_text("def upper(prompt, completion, row):\n"
                             "    return sum(c.isupper() for c in completion) / max(len(completion), 1)\n")
    cfg = {"base": {"debug": "qwen3_moe"}, "run_dir": str(d / "run"), "max_adapters": 2, "max_rank": 4,
           "max_length": 16, "checkpoint_every": 3, "adapters": [
               {"name": "up", "data": _rows(d / "p.jsonl", "rl_prompts.jsonl", 8), "reward": "rw.py:upper",
                "rank": 4, "group_size": 2, "batch_size": 2, "max_steps": 8, "optimizer": {"lr": 1e-2},
                "sampling": {"max_tokens": 3, "temperature": 1.0}}]}
    (d / "rl.yaml").write_text(yaml.safe_dump(cfg))
    return d / "rl.yaml"


@pytest.fixture(scope="module")
def train_reference(tmp_path_factory):
    """The uninterrupted train run every interrupted one must equal."""
    cfg = load_config(train_yaml(tmp_path_factory.mktemp("reference")))
    TrainJob(cfg, **QUIET).run()
    return Path(cfg.run_dir)


def logged(run_dir: Path, name: str) -> list[dict]:
    """An adapter's metric records, timings aside."""
    keep = ("step", "global_step", "loss", "lr", "grad_norm", "reward", "reward_errors")
    recs = [json.loads(ln) for ln in (run_dir / name / "metrics.jsonl").read_text().splitlines()]
    return [{k: r.get(k) for k in keep} for r in recs]


def assert_same_run(a: Path, b: Path, names):
    for name in names:
        wa = load_file(str(a / name / "final" / "adapter_model.safetensors"))
        wb = load_file(str(b / name / "final" / "adapter_model.safetensors"))
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa), name
        assert logged(a, name) == logged(b, name), name


# transformers' deprecation warnings (of the sampler's generate call) are not the CLI's lines
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore::FutureWarning")


def run_cli(words, cwd):
    return subprocess.run(words, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=120)


def interrupt_mid_run(words, cwd, metrics: Path, sig, after_step=2):
    """Start the CLI, send ``sig`` once ``metrics`` shows global step ``after_step``; -> (rc, stderr)."""
    proc = subprocess.Popen(words, cwd=cwd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while proc.poll() is None and time.monotonic() < deadline:
        lines = metrics.read_text().splitlines() if metrics.is_file() else []
        try:  # (the last line may be half written)
            reached = bool(lines) and json.loads(lines[-1])["global_step"] >= after_step
        except json.JSONDecodeError:
            reached = False
        if reached:
            proc.send_signal(sig)
            break
        time.sleep(0.01)
    _, err = proc.communicate(timeout=120)
    return proc.returncode, err


def the_one_line(err: str) -> str:
    """The line an interrupt printed: stderr's only line besides progress lines (`[rev] step 10/14 ...`)."""
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if ln.strip() and not re.match(r"\[\w+\] step \d+/\d+ ", ln)]
    assert len(lines) == 1, err
    return lines[0]


@needs_console_script
def test_ctrl_c_saves_a_checkpoint_and_prints_the_command_that_finishes_the_run(tmp_path, capsys,
                                                                                 train_reference):
    job = train_yaml(tmp_path)
    run = tmp_path / "run"
    rc, err = interrupt_mid_run([str(LORAFLEET), "train", "job.yaml", "--threads", "1", "--no-progress"],
                                tmp_path, run / "rev" / "metrics.jsonl", signal.SIGINT)
    assert rc == 130, err
    line = the_one_line(err)
    assert line.startswith("lorafleet train: interrupted (Ctrl-C) at global step "), line
    assert ", checkpoint saved; resume with: " in line, line
    command = line.split("resume with: ", 1)[1]
    assert shlex.split(command)[1:] == ["train", "job.yaml", "--threads", "1", "--no-progress", "--resume"]
    stopped_at = int(line.split("global step ")[1].split(",")[0])
    assert 2 <= stopped_at < 30
    assert (run / "checkpoints" / f"step-{stopped_at:06d}").is_dir()  # the interrupt-time checkpoint

    # a fresh start would lose it: refused, naming both ways out
    assert cli_main(["train", str(job), "--threads", "1"]) == 2
    assert (f"already holds a run, checkpointed at global step {stopped_at}; pass --resume to continue it, "
            "or --run-dir DIR to start a new run elsewhere (nothing was written)") in capsys.readouterr().err

    done = run_cli(shlex.split(command), tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"at global step {stopped_at} from step-{stopped_at:06d}" in done.stdout
    assert_same_run(train_reference, run, ("rev", "sort"))

    # a finished run: --resume only reports it (the end-of-run checkpoint holds no pending step)
    metrics = {n: (run / n / "metrics.jsonl").read_bytes() for n in ("rev", "sort")}
    capsys.readouterr()
    assert cli_main(["train", str(job), "--threads", "1", "--resume"]) == 0
    out = capsys.readouterr().out
    assert "the run is already complete (global step 30); nothing to resume" in out
    assert "adapter \\ task" in out and "loss curves:" in out
    assert metrics == {n: (run / n / "metrics.jsonl").read_bytes() for n in ("rev", "sort")}


def test_fresh_start_of_a_finished_run_is_refused_naming_resume_and_run_dir(train_reference, capsys):
    assert cli_main(["train", str(train_reference.parent / "job.yaml"), "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run, finished; pass --resume to see its result, or --run-dir DIR" in err, err


def test_run_stopped_before_its_first_checkpoint_starts_again_as_its_line_says(tmp_path, monkeypatch,
                                                                              capsys, train_reference):
    job = train_yaml(tmp_path)
    real_step = train_mod.TrainJob._shared_step

    def hard_stop_at_2(self):  # a second Ctrl-C (no time for a checkpoint), as kill -9 would leave it
        if self.global_step == 2:
            raise KeyboardInterrupt
        real_step(self)

    monkeypatch.setattr(train_mod.TrainJob, "_shared_step", hard_stop_at_2)
    assert cli_main(["train", str(job), "--threads", "1", "--no-progress"]) == 130
    monkeypatch.setattr(train_mod.TrainJob, "_shared_step", real_step)
    line = the_one_line(capsys.readouterr().err)
    assert line == (f"lorafleet train: interrupted (Ctrl-C) at global step 2, no checkpoint yet; "
                    f"start it again with: lorafleet train {job} --threads 1 --no-progress"), line
    run = tmp_path / "run"
    assert (run / "rev" / "metrics.jsonl").is_file() and not (run / "checkpoints").exists()

    # --resume of it would start over as well (nothing to resume, nothing to lose)
    resumed = TrainJob(load_config(job), resume=True, **QUIET)
    assert resumed._check_run_dir() is None and resumed._start_over

    assert cli_main(shlex.split(line.split("start it again with: ", 1)[1])[1:]) == 0
    out = capsys.readouterr().out
    assert "its run stopped before its first checkpoint (nothing to resume); starting it over" in out
    assert_same_run(train_reference, run, ("rev", "sort"))


@needs_console_script
def test_sigterm_stops_an_rl_run_like_ctrl_c_and_it_resumes_exactly(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    straight = load_rl_config(rl_yaml(tmp_path / "a"))
    RLJob(straight, **QUIET).run()

    b = tmp_path / "b"
    rl_yaml(b)
    rc, err = interrupt_mid_run([str(LORAFLEET), "rl", "rl.yaml", "--run-dir", "elsewhere", "--threads", "1"],
                                b, b / "elsewhere" / "up" / "metrics.jsonl", signal.SIGTERM)
    assert rc == 128 + signal.SIGTERM, err
    line = the_one_line(err)
    assert line.startswith("lorafleet rl: interrupted (SIGTERM) at global step ") and "checkpoint saved" in line
    command = line.split("resume with: ", 1)[1]
    assert shlex.split(command)[1:] == ["rl", "rl.yaml", "--run-dir", "elsewhere", "--threads", "1", "--resume"]
    monkeypatch.chdir(b)  # the command, in-process (the train test runs its command as a process)
    assert cli_main(shlex.split(command)[1:]) == 0
    assert_same_run(Path(straight.run_dir), b / "elsewhere", ("up",))


def test_stop_during_the_last_step_leaves_a_complete_run_whose_resume_only_writes_the_summary(tmp_path,
                                                                                             monkeypatch):
    cfg = load_config(train_yaml(tmp_path))
    real_step = train_mod.TrainJob._shared_step

    def ctrl_c_in_last_step(self):  # as the CLI's handler does on a first Ctrl-C
        real_step(self)
        self.stop_requested = self.global_step == 30

    monkeypatch.setattr(train_mod.TrainJob, "_shared_step", ctrl_c_in_last_step)
    job = TrainJob(cfg, **QUIET)
    with pytest.raises(KeyboardInterrupt):
        job.run()
    monkeypatch.setattr(train_mod.TrainJob, "_shared_step", real_step)
    assert job.stop_point() == "after its last step (global step 30, checkpoint saved), before its summary"
    run = Path(cfg.run_dir)
    assert not (run / "summary.json").exists()
    metrics = (run / "sort" / "metrics.jsonl").read_bytes()
    summary = TrainJob(cfg, resume=True, **QUIET).run()
    assert sorted(summary["adapters"]) == ["rev", "sort"] and (run / "summary.json").is_file()
    assert (run / "sort" / "metrics.jsonl").read_bytes() == metrics  # no step was done again
