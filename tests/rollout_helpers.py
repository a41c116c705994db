"""The real vLLM CPU engine for tests: ONE ``vllm serve`` subprocess per test session.

`vllm_server` (session fixture, imported by conftest.py) saves a small dense Qwen3 (2 layers,
hidden 64, head_dim 32 — vLLM's CPU attention has no head size 16 — and lorafleet's 105-token
character tokenizer, so vLLM starts fast) with ``save_pretrained``, starts vLLM on it from
``.venv-vllm`` with LoRA enabled, and yields where it is. Other tests may use it: load the same
base with `load_base_model` so lorafleet and vLLM hold identical weights. If ``.venv-vllm`` is
missing the tests FAIL saying how to create it: a skipped engine test would hide that the
exports were never loaded by vLLM.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

import vllm_moe_loader

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
MAX_LORA_RANK = 16
MAX_LORAS = 4


@dataclass(frozen=True)
class VLLMTestServer:
    url: str
    base_dir: Path
    max_lora_rank: int
    max_loras: int
    server: object  # lorafleet.rollout.vllm_local.VLLMServer
    python: Path
    moe_loader: object = None  # vllm_moe_loader.LoaderRun, started beside the server


def require_vllm_python() -> Path:
    from lorafleet.rollout.vllm_local import CREATE_VENV

    if not VLLM_PYTHON.is_file():
        pytest.fail(f"{VLLM_PYTHON} is missing: the vLLM tests need it. Create it from the repository root with "
                    f"`{CREATE_VENV}` (the README's test command does)", pytrace=False)
    return VLLM_PYTHON


def save_test_base(directory: Path) -> Path:
    """The dense debug Qwen3 (fp32) and its tokenizer, saved as a Hugging Face directory."""
    from lorafleet.data.tokenizer import build_tokenizer, save_tokenizer
    from lorafleet.models.debug import build_debug_model

    tok = build_tokenizer()
    model = build_debug_model("qwen3", seed=0, vocab_size=112, head_dim=32)
    model.save_pretrained(directory)
    save_tokenizer(tok, directory)
    return directory


def load_base_model(base_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(base_dir, local_files_only=True, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def vllm_server(tmp_path_factory):
    from lorafleet.rollout import RolloutError
    from lorafleet.rollout.vllm_local import VLLMServer

    python = require_vllm_python()
    root = tmp_path_factory.mktemp("vllm")
    base = save_test_base(root / "base")
    server = VLLMServer(base, max_lora_rank=MAX_LORA_RANK, max_loras=MAX_LORAS, python=str(python),
                        max_model_len=256, log_path=root / "vllm.log",
                        env={"OMP_NUM_THREADS": "1", "VLLM_CPU_OMP_THREADS_BIND": "nobind"}).start()
    moe_loader = None
    try:
        # the MoE loader check imports vLLM too: beside the server's start it costs little wall time
        moe_loader = vllm_moe_loader.start(python, root / "moe")
        server.wait_ready(300)
    except RolloutError as e:
        server.stop()
        pytest.fail(f"the vLLM test server did not start: {e}", pytrace=False)
    except BaseException:
        server.stop()
        raise
    try:
        yield VLLMTestServer(server.url, base, MAX_LORA_RANK, MAX_LORAS, server, python, moe_loader)
    finally:
        server.stop()
        if moe_loader is not None and moe_loader.proc.poll() is None:
            moe_loader.proc.kill()
