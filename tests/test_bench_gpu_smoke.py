"""Smoke test of the GPU benchmark scripts at toy shapes on CPU (``--tiny``): every row runs, has a
finite positive tokens/s, and the ratio lines are printed. Says nothing about speed."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_smoke_{name}", BENCH / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)  # the script puts bench/ on sys.path for gpu_common itself
    return mod


def _check(result, out, json_path, keys, ratio_texts):
    rows = {r["key"]: r for r in result["rows"]}
    assert list(rows) == keys, f"rows {list(rows)} != {keys}"
    for key, r in rows.items():
        assert not r.get("error"), (key, r.get("error"))
        assert math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0, (key, r["tokens_per_s"])
        assert r["label"] in out, f"row {key} missing from the printed table"
    for text in ratio_texts:
        assert text in out, f"ratio line {text!r} not printed"
    assert ("targets met:" in out or "targets: none" in out) and result["env"]["torch"] in out
    on_disk = json.loads(Path(json_path).read_text())
    assert [r["key"] for r in on_disk["rows"]] == keys
    assert {r["key"] for r in on_disk["ratios"]} == {r["key"] for r in result["ratios"]}


def test_dense_tiny(tmp_path, capsys):
    res = _load("bench_gpu_dense").main(["--tiny", "--json", str(tmp_path / "dense.json")])
    out = capsys.readouterr().out
    _check(res, out, tmp_path / "dense.json", ["base", "lf_1", "lf_8mix", "lf_16mix", "peft_tmux", "peft_1"],
           ["lorafleet 8 mixed vs PEFT time-multiplexed", "LoRA overhead over frozen base",
            "per-token cost, 16 adapters"])
    ratios = {r["key"]: r for r in res["ratios"]}
    for key in ("mixed_vs_tmux", "lora_overhead", "per_token_16_vs_1"):
        assert ratios[key]["value"] is not None and ratios[key]["target"] and ratios[key]["met"] is not None
    # every row computed the same loss path on the same tokens: per-token losses agree roughly
    # (random LoRA B of 0.01 moves them a little; a broken loss would be far off)
    per_tok = [r["loss"] / r["tokens"] for r in res["rows"]]
    assert max(per_tok) - min(per_tok) < 0.1, per_tok


def test_moe_tiny(tmp_path, capsys):
    res = _load("bench_gpu_moe").main(["--tiny", "--max-batch-check", "--json", str(tmp_path / "moe.json")])
    out = capsys.readouterr().out
    _check(res, out, tmp_path / "moe.json",
           ["base", "lf_attn", "lf_exp", "lf_exp_8mix", "lf_exp_pb", "lf_fit16", "peft_tp", "peft_fit16",
            "peft_attn"],
           ["expert-LoRA overhead over attention-only LoRA", "lorafleet vs PEFT target_parameters",
            "peak memory lorafleet / PEFT", "max-batch check, lorafleet batch 16", "max-batch check, PEFT"])
    ratios = {r["key"]: r for r in res["ratios"]}
    assert ratios["expert_overhead"]["value"] is not None and ratios["lf_vs_peft_tp"]["value"] is not None
    assert ratios["mem_lf_vs_peft"]["value"] is None  # peak memory: CUDA only
    assert out.count(": fits (") == 2


def test_kernels_tiny(tmp_path, capsys):
    mod = _load("bench_lora_kernels")
    res = mod.main(["--tiny", "--json", str(tmp_path / "kernels.json")])
    out = capsys.readouterr().out
    kinds = ["lora", "epi", "gemm"]
    keys = []
    for d_in, d_out in mod.TINY_SHAPES:
        s = f"{d_in}x{d_out}"
        keys.append(f"{s}/base")
        keys += [f"{s}/{k}{n}/reference" for k in kinds for n in (1, 16)]
    _check(res, out, tmp_path / "kernels.json", keys,
           [f"{d_in}x{d_out}".ljust(11) + "lora  reference  1 adapter" for d_in, d_out in mod.TINY_SHAPES]
           + ["16 vs 1"])
    assert all(r["value"] is not None for r in res["ratios"])


@pytest.mark.parametrize("script", ["bench_gpu_dense", "bench_gpu_moe", "bench_lora_kernels"])
def test_help_runs_without_torch_work(script, capsys):
    with pytest.raises(SystemExit) as e:
        _load(script).parse_args(["--help"])
    assert e.value.code == 0
    assert "--tiny" in capsys.readouterr().out
