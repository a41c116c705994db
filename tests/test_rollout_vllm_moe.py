"""MoE exports (qwen3_moe, mixtral debug bases, `peft` 3-D and `vllm` per-expert) accepted by
vLLM's own LoRA loader in .venv-vllm: names and shapes (how: tests/vllm_moe_loader.py).

vLLM's MoE LoRA runs Triton kernels, which the CPU build has not (``triton.language has no
attribute float32``): MoE *generation* with an adapter is GPU-only in vLLM, so on CPU the files
are checked by its loader without generating.
"""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.vllm


def test_moe_exports_are_accepted_by_vllms_lora_loader(vllm_server):
    run = vllm_server.moe_loader  # started beside the server (rollout_helpers.vllm_server)
    try:
        code, loaded, err = run.result(timeout=300)
    finally:
        run.proc.kill()
    assert code == 0 and loaded is not None, err
    assert set(loaded) == set(run.files)
    for path, (arch, fmt, experts, shapes) in run.files.items():
        modules = loaded[path]
        # every tensor of the file reached vLLM, under its module name, with its shape
        assert 2 * len(modules) == len(shapes), (arch, fmt, sorted(modules))
        for name, (a_shape, b_shape) in modules.items():
            key = f"base_model.model.{name}"
            assert shapes[f"{key}.lora_A.weight"] == a_shape and shapes[f"{key}.lora_B.weight"] == b_shape, name
        experts_seen = {n for n in modules if ".experts" in n}
        if fmt == "vllm":  # per-expert 2-D names: every expert of every layer, gate/up/down each
            assert len(experts_seen) == 2 * experts * 3
        else:  # PEFT target_parameters: the 3-D fused tensors (vLLM needs is_3d_lora_weight for them)
            assert experts_seen and all(n.endswith((".experts", ".experts.base_layer")) for n in experts_seen)
        assert any(n.endswith("self_attn.q_proj") for n in modules) and any(n.endswith("o_proj") for n in modules)
