"""A real `lorafleet rl` run whose rollouts come from vLLM (the session's `vllm_server`).

The job trains on the server's own base directory; every step's samples and their logprobs come
from vLLM, the adapter is pushed after every optimizer step, and the rewards rise."""

from __future__ import annotations

import json

import yaml

from lorafleet.jobs.rl import RLJob, load_rl_config
from lorafleet.rollout.vllm import VLLMEngine

REWARD = '''
def upper(prompt, completion, row):
    """The share of the answer's letters that are upper case (a format reward that learns fast)."""
    letters = [c for c in completion if c.isalpha()]
    return sum(c.isupper() for c in letters) / len(letters) if letters else 0.0
'''
STEPS = 12


def rl_config(tmp_path, server):
    (tmp_path / "rw.py").write_text(REWARD)
    prompts = [{"prompt": f"say {w} ="} for w in ("abc", "dog", "hi", "tree", "moon", "sky", "cat", "red")]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(p) + "\n" for p in prompts))
    cfg = {"base": {"path": str(server.base_dir)}, "run_dir": str(tmp_path / "run"), "max_adapters": 1,
           "max_rank": 8, "max_length": 32, "checkpoint_every": 0, "seed": 3,
           "rollout": {"engine": "vllm", "url": server.url, "max_lora_rank": server.max_lora_rank, "retries": 1},
           "adapters": [{"name": "up", "data": "p.jsonl", "reward": "rw.py:upper", "rank": 8, "alpha": 16,
                         "loss": "importance_sampling", "group_size": 8, "batch_size": 8, "max_steps": STEPS,
                         "optimizer": {"lr": 0.1, "grad_clip_norm": 1.0},
                         # a cool temperature: the random-init base's logits are nearly flat, and at
                         # 0.2 a small move of the adapter changes what is sampled (tuned: 0.45 -> 0.85)
                         "sampling": {"max_tokens": 8, "temperature": 0.2}}]}
    (tmp_path / "rl.yaml").write_text(yaml.safe_dump(cfg))
    return load_rl_config(tmp_path / "rl.yaml")


def test_rl_through_vllm_pushes_every_step_and_rewards_rise(tmp_path, vllm_server, monkeypatch):
    pushed, generated = [], []
    real_push, real_generate = VLLMEngine.push, VLLMEngine.generate

    def push(self, snap):
        pushed.append((snap.name, snap.version))
        return real_push(self, snap)

    def generate(self, adapter, prompts, params, n):
        out = real_generate(self, adapter, prompts, params, n)
        generated.append((adapter, len(pushed)))
        return out

    monkeypatch.setattr(VLLMEngine, "push", push)
    monkeypatch.setattr(VLLMEngine, "generate", generate)
    cfg = rl_config(tmp_path, vllm_server)
    RLJob(cfg, progress=False, log=lambda *a: None).run()

    # one push before the first rollout, then one after every optimizer step but the last
    assert pushed == [("up", v) for v in range(STEPS)]
    assert [g for g in generated] == [("up", s + 1) for s in range(STEPS)]  # each rollout after its push
    recs = [json.loads(ln) for ln in (tmp_path / "run" / "up" / "metrics.jsonl").read_text().splitlines()[1:]]
    assert len(recs) == STEPS
    # vLLM's logprobs are the behaviour policy; the gap to the trainer's own is logged and small (fp32 both)
    gaps = [r["kl_sample_train"] for r in recs if "kl_sample_train" in r]
    assert len(gaps) >= STEPS - 2 and max(abs(g) for g in gaps) < 1e-3, gaps
    rewards = [r["reward"] for r in recs]
    print("rewards", [round(r, 3) for r in rewards], "kl_sample_train max", max(abs(g) for g in gaps))
    first, last = sum(rewards[:3]) / 3, sum(rewards[-3:]) / 3
    assert last > first + 0.2, rewards
