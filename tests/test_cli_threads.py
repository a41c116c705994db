"""`--threads`: the default follows the base (1 for built-in bases, torch's own for a model dir)."""

from __future__ import annotations

import argparse

import pytest
import torch

from lorafleet import cli


@pytest.fixture(autouse=True)
def keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


def _args(threads):
    return argparse.Namespace(threads=threads)


def test_builtin_base_defaults_to_one_thread():
    torch.set_num_threads(2)
    cli._threads(_args(None), builtin_base=True)
    assert torch.get_num_threads() == 1


def test_model_dir_keeps_torch_default_and_explicit_values_win():
    torch.set_num_threads(2)
    cli._threads(_args(None), builtin_base=False)
    assert torch.get_num_threads() == 2
    cli._threads(_args(3), builtin_base=True)
    assert torch.get_num_threads() == 3
    cli._threads(_args(0), builtin_base=True)  # 0: leave torch's choice
    assert torch.get_num_threads() == 3


def test_negative_threads_is_one_line(capsys, tmp_path):
    quickstart = str(cli.Path(__file__).resolve().parents[1] / "examples" / "quickstart.yaml")
    rc = cli.main(["train", quickstart, "--threads", "-1", "--run-dir", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "--threads must be >= 0" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written
