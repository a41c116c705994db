"""vLLM's own LoRA loader run on lorafleet's MoE exports, in .venv-vllm (test_rollout_vllm_moe.py).

vLLM's MoE LoRA runs Triton kernels, which its CPU build has not, so MoE files are checked with
the loader code vLLM's worker runs on a ``load_lora_adapter`` request, without generating:
``PEFTHelper.from_local_dir`` + ``validate_legal`` and ``LoRAModel.from_local_checkpoint``
(which refuses any module the model does not expect). The expected modules are built as the
worker builds them (``LRUCacheWorkerLoRAManager._load_adapter`` with the
``process_packed_modules_mapping`` of a MoE model under ``--enable-mixed-moe-lora-format``): the
model class's ``packed_modules_mapping``, ``experts`` and the per-expert names of vLLM's
``RoutedExperts.build_expert_params_mapping``. Instantiating vLLM's model itself needs its CPU
worker (minutes on 2 busy cores), so that part is re-stated here.

`start` launches the check as a subprocess and returns at once: the vllm_server fixture starts it
beside the server (vLLM's imports take most of either's time, one core each), the test collects it.
"""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

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
                                           dtype=torch.float32,
                                           weights_mapper=mapper.get_rename_mapper() if mapper else None)
    out[job["path"]] = {n: [list(w.lora_a.shape), list(w.lora_b.shape)] for n, w in lora.loras.items()}
print("LOADED " + json.dumps(out))
"""


def _export(directory: Path, arch: str):
    import lorafleet as lf
    from lorafleet.models.debug import build_debug_model

    model = build_debug_model(arch, seed=0)
    fleet = lf.Fleet(model, max_adapters=1, max_rank=8)
    fleet.add_adapter("m", lf.AdapterConfig(rank=4, target_modules=["q_proj", "o_proj"], experts=True, seed=0))
    paths = {}
    for fmt in ("peft", "vllm"):
        paths[fmt] = directory / f"{arch}-{fmt}"
        fleet.save_adapter("m", paths[fmt], format=fmt)
    experts = getattr(model.config, "num_experts", None) or model.config.num_local_experts
    return paths, experts


def _file_shapes(path: Path) -> dict[str, list[int]]:
    from safetensors import safe_open

    with safe_open(str(path / "adapter_model.safetensors"), "pt") as f:
        return {k: list(f.get_slice(k).get_shape()) for k in f.keys()}


@dataclass
class LoaderRun:
    proc: subprocess.Popen
    files: dict  # path -> (arch, format, experts, {tensor name: shape})
    out: Path
    err: Path

    def result(self, timeout: float = 300) -> tuple[int, dict | None, str]:
        """(exit code, {path: {module: [A shape, B shape]}} or None, the stderr tail)."""
        code = self.proc.wait(timeout)
        lines = [ln for ln in self.out.read_text().splitlines() if ln.startswith("LOADED ")]
        loaded = json.loads(lines[0][len("LOADED "):]) if lines else None
        return code, loaded, self.err.read_text()[-3000:]


def start(python: Path, directory: Path) -> LoaderRun:
    directory.mkdir(parents=True, exist_ok=True)
    jobs, files = [], {}
    for arch in ("qwen3_moe", "mixtral"):
        paths, experts = _export(directory, arch)
        for fmt, path in paths.items():
            jobs.append({"arch": arch, "path": str(path), "num_experts": experts})
            files[str(path)] = (arch, fmt, experts, _file_shapes(path))
    out, err = directory / "loader.out", directory / "loader.err"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen([str(python), "-c", LOADER, json.dumps(jobs)], stdout=o, stderr=e,
                                stdin=subprocess.DEVNULL,
                                env={"PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1", "HOME": str(directory)})
    return LoaderRun(proc, files, out, err)
