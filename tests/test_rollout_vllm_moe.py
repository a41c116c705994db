"""MoE exports (qwen3_moe, mixtral debug bases) through vLLM's own LoRA loader, in .venv-vllm.

vLLM's MoE LoRA runs Triton kernels, which the CPU build has not (``triton.language has no
attribute float32``): MoE *generation* with an adapter is GPU-only there, so on CPU these files
are checked with the loader code vLLM's worker runs on a ``load_lora_adapter`` request, without
generating: ``PEFTHelper.from_local_dir`` + ``validate_legal`` (rank, config) and
``LoRAModel.from_local_checkpoint`` (which refuses any module the model does not expect). The
expected modules are built as the worker builds them (``LRUCacheWorkerLoRAManager._load_adapter``
with the ``process_packed_modules_mapping`` of a MoE model under
``--enable-mixed-moe-lora-format``): the model class's ``packed_modules_mapping``, ``experts``,
and the per-expert names of vLLM's ``RoutedExperts.build_expert_params_mapping``. Instantiating
vLLM's model itself needs its CPU worker (minutes on 2 cores), so that part is re-stated here.
"""

from __future__ import annotations

import json
import subprocess

import pytest
from rollout_helpers import require_vllm_python
from safetensors import safe_open

import lorafleet as lf
from lorafleet.models.debug import build_debug_model

pytestmark = pytest.mark.vllm

LOADER = r"""
import json, sys
import torch
from vllm.config.lora import LoRAConfig
from vllm.lora.lora_model import LoRAModel
from vllm.lora.peft_helper import PEFTHelper
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
from vllm.model_executor.models.mixtral import MixtralForCausalLM
from vllm.model_executor.models.qwen3_moe import Qwen3MoeForCausalLM

CLASSES = {"qwen3_moe": (Qwen3MoeForCausalLM, ("gate_proj", "down_proj", "up_proj")),
           "mixtral": (MixtralForCausalLM, ("w1", "w2", "w3"))}
out = {}
for job in json.loads(sys.argv[1]):
    cls, (gate, down, up) = CLASSES[job["arch"]]
    # the worker's expected_lora_modules: supported linears (q/k/v packed as qkv_proj), experts
    packed = {k: list(v) for k, v in cls.packed_modules_mapping.items()}
    packed["experts"] = [w.rstrip(".") for _, w, _, _ in
                         RoutedExperts.build_expert_params_mapping(gate, down, up, job["num_experts"])]
    expected = set()
    for module in ("qkv_proj", "o_proj", "gate", "experts"):
        expected.update(packed.get(module, [module]))
        if module == "experts":
            expected.add(module)
    helper = PEFTHelper.from_local_dir(job["path"], 512)
    helper.validate_legal(LoRAConfig(max_lora_rank=16, max_loras=1, enable_mixed_moe_lora_format=True))
    mapper = getattr(cls, "hf_to_vllm_mapper", None)
    lora = LoRAModel.from_local_checkpoint(job["path"], expected, helper, lora_model_id=1, device="cpu",
                                           dtype=torch.float32, weights_mapper=mapper.get_rename_mapper() if mapper else None)
    out[job["path"]] = {n: [list(w.lora_a.shape), list(w.lora_b.shape)] for n, w in lora.loras.items()}
print("LOADED " + json.dumps(out))
"""


def _export(tmp_path, arch):
    model = build_debug_model(arch, seed=0)
    fleet = lf.Fleet(model, max_adapters=1, max_rank=8)
    fleet.add_adapter("m", lf.AdapterConfig(rank=4, target_modules=["q_proj", "o_proj"], experts=True, seed=0))
    paths = {}
    for fmt in ("peft", "vllm"):
        paths[fmt] = tmp_path / f"{arch}-{fmt}"
        fleet.save_adapter("m", paths[fmt], format=fmt)
    experts = getattr(model.config, "num_experts", None) or model.config.num_local_experts
    return paths, experts


def _file_shapes(path) -> dict[str, list[int]]:
    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}


def test_moe_exports_are_accepted_by_vllms_lora_loader(tmp_path):
    python = require_vllm_python()
    jobs, files = [], {}
    for arch in ("qwen3_moe", "mixtral"):
        paths, experts = _export(tmp_path, arch)
        for fmt, path in paths.items():
            jobs.append({"arch": arch, "path": str(path), "num_experts": experts})
            files[str(path)] = (arch, fmt, experts, _file_shapes(path))
    p = subprocess.run([str(python), "-c", LOADER, json.dumps(jobs)], capture_output=True, text=True, timeout=240,
                       env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(tmp_path)})
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("LOADED ")]
    assert p.returncode == 0 and lines, p.stderr[-3000:]
    loaded = json.loads(lines[0][len("LOADED "):])
    for path, (arch, fmt, experts, shapes) in files.items():
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
