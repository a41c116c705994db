"""`lorafleet train`: queueing, outputs, exact resume after a crash, and bad input caught before
training starts with nothing written over."""

import json
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from lorafleet.cli import main as cli_main
from lorafleet.jobs import train as train_mod
from lorafleet.jobs.config import ConfigError, load_config, parse_config
from lorafleet.jobs.train import TrainJob

DATA = Path(__file__).resolve().parents[1] / "examples" / "data"


def write_rows(path, task, n, start=0):
    rows = [json.loads(ln) for ln in (DATA / f"{task}_train.jsonl").read_text().splitlines()][start:start + n]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def job_yaml(tmp_path, n_adapters=3, max_adapters=2, **top):
    adapters = []
    for i, task in enumerate(["rev", "sort", "upper"][:n_adapters]):
        adapters.append({
            "name": task, "data": str(write_rows(tmp_path / f"{task}.jsonl", task, 24)),
            "eval_data": str(write_rows(tmp_path / f"{task}_eval.jsonl", task, 6, start=100)),
            "rank": 2 + 2 * i, "alpha": 8, "batch_size": 3 + i, "max_steps": 4 + 2 * i, "eval_every": 3,
            "grad_accum": 1 + (i == 1), "seed": i,
            "optimizer": {"lr": 1e-2, "schedule": "cosine", "warmup_steps": 1, "grad_clip_norm": 1.0},
        })
    cfg = {"base": {"debug": "qwen3_moe"}, "run_dir": str(tmp_path / "run"), "max_adapters": max_adapters,
           "max_rank": 8, "max_length": 24, "checkpoint_every": 3, "adapters": adapters}
    cfg.update(top)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def final_weights(run_dir, name):
    return load_file(str(Path(run_dir) / name / "final" / "adapter_model.safetensors"))


def losses(run_dir, name):
    recs = [json.loads(ln) for ln in (Path(run_dir) / name / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["global_step"], r.get("loss"), r.get("eval_loss"), r.get("lr")) for r in recs]


def test_job_queues_trains_exports_and_plots(tmp_path):
    cfg = load_config(job_yaml(tmp_path))
    summary = TrainJob(cfg, progress=False, log=lambda *a: None).run()
    run = Path(cfg.run_dir)
    assert sorted(summary["adapters"]) == ["rev", "sort", "upper"]
    # 3 adapters, 2 slots: upper waited for a free slot (rev finishes first, at global step 4)
    first_upper = json.loads((run / "upper" / "metrics.jsonl").read_text().splitlines()[0])
    assert first_upper["global_step"] == 4
    for name, steps in (("rev", 4), ("sort", 6), ("upper", 8)):
        recs = [json.loads(ln) for ln in (run / name / "metrics.jsonl").read_text().splitlines()]
        assert [r["step"] for r in recs] == list(range(steps + 1))
        assert "eval_acc" in recs[-1] and "data_truncated" in recs[0]
        assert (run / name / "final" / "adapter_config.json").is_file()
        assert any((run / "tb" / name).iterdir())
    assert (run / "loss_curves.png").stat().st_size > 10_000
    assert set(summary["accuracy"]) == {"base", "rev", "sort", "upper"}
    # the final export is a PEFT adapter of the trained weights (not the init)
    w = final_weights(run, "rev")
    assert any("lora_B" in k and w[k].abs().sum() > 0 for k in w)


def test_resume_after_crash_is_bitwise_identical(tmp_path, monkeypatch):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    straight = load_config(job_yaml(tmp_path / "a"))
    TrainJob(straight, progress=False, log=lambda *a: None).run()

    crashed = load_config(job_yaml(tmp_path / "b"))
    real_step = train_mod.TrainJob._shared_step

    def crash_at_5(self):
        if self.global_step == 5:
            raise KeyboardInterrupt("simulated kill")
        real_step(self)

    monkeypatch.setattr(train_mod.TrainJob, "_shared_step", crash_at_5)
    with pytest.raises(KeyboardInterrupt):
        TrainJob(crashed, progress=False, log=lambda *a: None).run()
    monkeypatch.setattr(train_mod.TrainJob, "_shared_step", real_step)
    assert (Path(crashed.run_dir) / "checkpoints" / "LATEST").read_text().strip() == "step-000003"
    TrainJob(crashed, resume=True, progress=False, log=lambda *a: None).run()
    for name in ("rev", "sort", "upper"):
        a, b = final_weights(straight.run_dir, name), final_weights(crashed.run_dir, name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
        assert losses(straight.run_dir, name) == losses(crashed.run_dir, name), name


def test_existing_run_dir_needs_resume_and_nothing_is_written_over(tmp_path):
    cfg = load_config(job_yaml(tmp_path, n_adapters=1))
    TrainJob(cfg, progress=False, log=lambda *a: None).run()
    metrics = (Path(cfg.run_dir) / "rev" / "metrics.jsonl").read_bytes()
    with pytest.raises(ValueError, match="already holds a run"):
        TrainJob(cfg, progress=False).run()
    assert (Path(cfg.run_dir) / "rev" / "metrics.jsonl").read_bytes() == metrics
    fresh = load_config(job_yaml(tmp_path / "x", n_adapters=1) if (tmp_path / "x").mkdir() is None else None)
    with pytest.raises(ValueError, match="no checkpoint to resume"):
        TrainJob(fresh, resume=True).run()


def _base_cfg(tmp_path):
    return yaml.safe_load(job_yaml(tmp_path, n_adapters=2).read_text())


@pytest.mark.parametrize("mutate,message", [
    (lambda c: c.update(learning_rate=1), r"unknown field\(s\) \['learning_rate'\]"),
    (lambda c: c["adapters"][0].update(lr=1), r"adapters\[0\]: unknown field\(s\) \['lr'\]"),
    (lambda c: c["adapters"][1].update(name="rev"), "appears twice"),
    (lambda c: c["adapters"][0].update(rank=64), "rank 64 above max_rank 8"),
    (lambda c: c["adapters"][0].update(data="/nope.jsonl"), "does not exist"),
    (lambda c: c["adapters"][0].update(epochs=1), "exactly one of max_steps or epochs"),
    (lambda c: c["adapters"][0]["optimizer"].update(schedule="step"), "schedule"),
    (lambda c: c["adapters"][0].update(expert_sharing="all"), "expert_sharing"),
    (lambda c: c.update(base={"debug": "qwen3_moe", "path": "/x"}), "exactly one of 'debug'"),
])
def test_bad_config_names_the_problem(tmp_path, mutate, message):
    c = _base_cfg(tmp_path)
    mutate(c)
    with pytest.raises(ConfigError, match=message):
        parse_config(c, "job.yaml")


def test_malformed_jsonl_fails_before_training_with_file_and_line(tmp_path):
    path = job_yaml(tmp_path, n_adapters=2)
    bad = tmp_path / "sort.jsonl"
    lines = bad.read_text().splitlines()
    lines[6] = '{"prompt": "sort: ab =", "completion": '
    bad.write_text("\n".join(lines) + "\n")
    cfg = load_config(path)
    with pytest.raises(ValueError, match=r"sort\.jsonl:7"):
        TrainJob(cfg, progress=False, log=lambda *a: None).run()
    assert not Path(cfg.run_dir).exists()  # nothing written


def test_overflow_counts_truncated_and_skipped(tmp_path):
    for overflow, key in (("truncate", "data_truncated"), ("skip", "data_skipped")):
        d = tmp_path / overflow
        d.mkdir()
        c = yaml.safe_load(job_yaml(d, n_adapters=1).read_text())
        c.update(max_length=12, overflow=overflow)
        cfg = parse_config(c, str(d / "job.yaml"))
        if overflow == "skip":
            with pytest.raises(ValueError, match="no usable example"):
                TrainJob(cfg, progress=False, log=lambda *a: None).run()
            continue
        TrainJob(cfg, progress=False, log=lambda *a: None).run()
        first = json.loads((Path(cfg.run_dir) / "rev" / "metrics.jsonl").read_text().splitlines()[0])
        # every row is too long: kept truncated, or dropped when truncation left no trained token
        assert first[key] > 0 and first[key] + first["data_skipped"] == 24


def test_cli_reports_user_errors_in_one_line(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: {debug: qwen3_moe}\nadapters: []\n")
    assert cli_main(["train", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "lorafleet train: error:" in err and "non-empty list" in err and "Traceback" not in err
