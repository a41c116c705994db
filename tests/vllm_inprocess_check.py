"""Run with the vLLM environment and lorafleet from source (``PYTHONPATH=src .venv-vllm/bin/python
tests/vllm_inprocess_check.py WORKDIR``): the in-process vLLM sink (rollout/vllm_inprocess.py)
against lorafleet's own sampler on the same base. Prints one ``VLLM_INPROCESS {json}`` line;
tests/test_rollout_sglang.py's slow test reads it. vLLM's V1 engine starts a worker process, hence
the ``__main__`` guard.
"""

import json
import sys
from pathlib import Path

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
PROMPTS = [[1, 10, 11], [1, 12], [1, 30, 31, 32]]


def _rel(a, b):
    import torch

    a, b = torch.tensor(a[1:], dtype=torch.float64), torch.tensor(b[1:], dtype=torch.float64)
    return float((a - b).norm() / b.norm())


def _train(fleet, target, steps):
    import lorafleet as lf

    for _ in range(steps):
        fleet.forward_backward([lf.Example("a", p + target[:-1], p[1:] + target) for p in PROMPTS],
                               loss_fn="cross_entropy")
        fleet.optim_step(["a"])


def main(work: Path):
    import torch
    from transformers import AutoModelForCausalLM

    import lorafleet as lf
    from lorafleet.data.tokenizer import build_tokenizer, save_tokenizer
    from lorafleet.engine.sampling import SampleRequest
    from lorafleet.models.debug import build_debug_model
    from lorafleet.rollout.vllm_inprocess import make_vllm_inprocess_engine

    base = work / "base"  # vLLM's CPU attention has no head size 16: head_dim 32
    build_debug_model("qwen3", seed=0, vocab_size=112, head_dim=32).save_pretrained(base)
    save_tokenizer(build_tokenizer(), base)
    model = AutoModelForCausalLM.from_pretrained(base, local_files_only=True, dtype=torch.float32).eval()
    fleet = lf.Fleet(model, max_adapters=2, max_rank=16)
    fleet.add_adapter("a", lf.AdapterConfig(rank=8, alpha=16, target_modules=TARGETS, seed=0))
    fleet.set_optimizer("a", lf.OptimConfig(lr=5e-2))
    _train(fleet, [40, 41, 42, 43, 2], 8)
    eng = make_vllm_inprocess_engine({"engine": "vllm-inprocess", "dtype": "float32", "max_model_len": 256},
                                     base_dir=str(base), max_rank=16)
    greedy = lf.SamplingParams(max_tokens=6, temperature=0)
    out = {}

    def compare(tag):
        name = eng.push(fleet.snapshot("a", layout="peft"))
        ours = [g[0].tokens for g in fleet.sample([SampleRequest("a", p) for p in PROMPTS], greedy)]
        theirs = [g[0].tokens for g in eng.generate(name, PROMPTS, greedy, 2)]
        full = PROMPTS[0] + ours[0]
        out[tag] = {"ours": ours, "vllm": theirs,
                    "prompt_rel": _rel(eng.prompt_logprobs(name, full), fleet.compute_logprobs("a", full))}

    compare("first")
    _train(fleet, [50, 51, 52, 53, 2], 10)
    compare("after_steps")  # an in-place push: the same name, the new weights
    sampled = eng.generate("a", PROMPTS, lf.SamplingParams(max_tokens=5, temperature=1.0, seed=3), 3)
    rels = []
    for p, group in zip(PROMPTS, sampled):
        for s in group:
            lps = fleet.compute_logprobs("a", p + s.tokens)[len(p):]
            rels.append(_rel([None] + s.logprobs, [None] + lps))
    out["sampled_rel_max"] = max(rels)
    out["sampled_distinct"] = len({tuple(s.tokens) for s in sampled[0]})
    out["base_tokens"] = eng.generate(None, PROMPTS[:1], greedy, 1)[0][0].tokens
    out["base_ours"] = fleet.sample([SampleRequest(None, PROMPTS[0])], greedy)[0][0].tokens
    eng.close()
    print("VLLM_INPROCESS " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
