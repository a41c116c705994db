"""Run under a Python that has SGLang (``pip install sglang==0.5.23``; it imports on CPU): checks
lorafleet's ``sglang`` exports with SGLang's own LoRA loader code, and request bodies with SGLang's
/generate JSON contract. Used by tests/test_rollout_sglang.py (slow); prints one JSON object.

    python sglang_loader_check.py job.json

job.json: {"adapters": [{"base": dir, "adapter": dir, "out": file.safetensors}], "bodies": [...]}.
Per adapter: SGLang's LoRAConfig reads adapter_config.json; LoRAAdapter runs its weight pass
(``initialize_weights_from_tensors``: the same ``_process_weight`` + ``_normalize_weights`` as a
load from disk, whose file reader needs a running server's global args) and the normalized
tensors (qkv_proj / gate_up_proj stacking as SGLang builds them) are saved to ``out``; for each
dense module the shape SGLang's memory pool slices for it (``[c*r, in]`` / ``[out, r]``, from
``get_default_hidden_dim`` and ``get_stacked_multiply``) is compared with the weight's.
"""

import json
import sys


def check_adapter(job):
    from safetensors.torch import load_file, save_file
    from transformers import AutoConfig

    from sglang.srt.configs.load_config import LoadConfig
    from sglang.srt.lora.lora import LoRAAdapter
    from sglang.srt.lora.lora_config import LoRAConfig
    from sglang.srt.lora.utils import (get_default_hidden_dim, get_normalized_target_modules,
                                       get_stacked_multiply, get_target_module_name)

    base = AutoConfig.from_pretrained(job["base"])
    config = LoRAConfig(job["adapter"])
    adapter = LoRAAdapter("check", config, base, LoadConfig(), None, None)
    adapter.initialize_weights_from_tensors(load_file(job["adapter"] + "/adapter_model.safetensors"))
    targets = get_normalized_target_modules(config.target_modules)
    r, problems, out = config.r, [], {}
    for layer_id, layer in enumerate(adapter.layers):
        for name, w in layer.weights.items():
            out[name] = w.contiguous()
            module = get_target_module_name(name, targets)
            if ".experts." in name:
                continue  # MoE: the test compares the values SGLang slices out
            c = get_stacked_multiply(module)
            fin, fout = get_default_hidden_dim(module, base, layer_id)
            want = (c * r, fin) if "lora_A" in name else (fout, r)
            if tuple(w.shape) != want:
                problems.append(f"{name}: SGLang's buffer for {module} takes {list(want)}, "
                                f"the weight is {list(w.shape)}")
    save_file(out, job["out"])
    return {"r": r, "alpha": config.lora_alpha, "targets": sorted(targets), "problems": problems,
            "shapes": {k: list(v.shape) for k, v in out.items()}}


def check_body(body):
    from sglang.api.v1.api_types import GenerateRequest, JsonContractError

    try:
        GenerateRequest.from_json_value(body)
    except JsonContractError as e:
        return str(e)
    return None


def main():
    job = json.loads(open(sys.argv[1]).read())
    import sglang

    result = {"sglang": sglang.__version__, "adapters": [], "bodies": []}
    for a in job.get("adapters", []):
        try:
            result["adapters"].append(check_adapter(a))
        except Exception as e:  # noqa: BLE001 - reported to the test, which names it
            result["adapters"].append({"error": f"{type(e).__name__}: {e}"})
    result["bodies"] = [check_body(b) for b in job.get("bodies", [])]
    print("SGLANG_CHECK " + json.dumps(result))


if __name__ == "__main__":
    main()
