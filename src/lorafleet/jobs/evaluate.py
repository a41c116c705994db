"""Evaluation on held-out examples: loss per trained token and exact-match accuracy.

Accuracy is teacher-forced exact match: an example counts when the argmax at every trained
position equals its target. That is the same as greedy decoding reproducing the completion
exactly (greedy follows the targets as long as every argmax matches), without a decode loop.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..types import Example


@torch.no_grad()
def evaluate(fleet, adapter: str | None, examples: list[Example], batch_size: int = 32) -> dict:
    """Metrics of ``adapter`` (None: the base model) on ``examples`` (their own adapter field is
    ignored): {"eval_loss", "eval_acc", "eval_examples"}."""
    if not examples:
        return {}
    dev = fleet.lora_device
    loss_sum, tok_sum, correct = 0.0, 0.0, 0
    for s in range(0, len(examples), batch_size):
        chunk = examples[s : s + batch_size]
        T = max(len(e.input_tokens) for e in chunk)
        ids = torch.zeros(len(chunk), T, dtype=torch.long)
        mask = torch.zeros(len(chunk), T, dtype=torch.long)
        tgt = torch.zeros(len(chunk), T, dtype=torch.long)
        w = torch.zeros(len(chunk), T)
        for i, e in enumerate(chunk):
            n = len(e.input_tokens)
            ids[i, :n], mask[i, :n] = torch.tensor(e.input_tokens), 1
            tgt[i, :n], w[i, :n] = torch.tensor(e.target_tokens), torch.tensor(e.weights)
        logits = fleet.forward(ids.to(dev), attention_mask=mask.to(dev), adapters=[adapter] * len(chunk)).logits
        logits = logits.float().cpu()
        lp = F.log_softmax(logits, -1).gather(2, tgt[..., None]).squeeze(-1)
        trained = w > 0
        loss_sum += float(-(lp * trained).sum())
        tok_sum += float(trained.sum())
        hit = (logits.argmax(-1) == tgt) | ~trained
        correct += int(hit.all(dim=1).sum())
    return {"eval_loss": loss_sum / max(tok_sum, 1.0), "eval_acc": correct / len(examples),
            "eval_examples": len(examples)}


def accuracy_matrix(fleet, adapters: list[str | None], tasks: dict[str, list[Example]],
                    batch_size: int = 32) -> dict[str | None, dict[str, float]]:
    """Exact-match accuracy of each adapter (rows; None = base model) on each task's eval set."""
    return {a: {t: evaluate(fleet, a, exs, batch_size)["eval_acc"] for t, exs in tasks.items()} for a in adapters}


def format_matrix(matrix: dict[str | None, dict[str, float]]) -> str:
    tasks = list(next(iter(matrix.values())))
    width = max([10] + [len(t) + 2 for t in tasks])
    head = "adapter \\ task".ljust(16) + "".join(t.rjust(width) for t in tasks)
    lines = [head, "-" * len(head)]
    for a, row in matrix.items():
        cells = "".join((f"{100 * row[t]:.0f}%" + ("*" if a == t else " ")).rjust(width) for t in tasks)
        lines.append(("(base model)" if a is None else a).ljust(16) + cells)
    lines.append("* = the adapter's own task (exact-match accuracy on held-out examples)")
    return "\n".join(lines)
