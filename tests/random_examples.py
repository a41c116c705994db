"""Random training examples for the precision tests (bf16 / fp16 against fp32)."""

import torch

import lorafleet as lf


def random_examples(names, seed, n=2, arrays=False, weight=None, vocab=256):
    """``n`` examples per adapter name, 5–9 tokens each, ids in [3, vocab). Token weights are
    ``weight`` everywhere, or uniform random; ``arrays`` adds sampler logprobs and advantages
    (for the policy losses)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for name in names:
        for _ in range(n):
            L = int(torch.randint(5, 10, (1,), generator=g))
            toks = torch.randint(3, vocab, (L + 1,), generator=g).tolist()
            kw = {}
            if arrays:
                kw = {"logprobs": (-torch.rand(L, generator=g) * 6).tolist(),
                      "advantages": torch.randn(L, generator=g).tolist()}
            w = [weight] * L if weight is not None else torch.rand(L, generator=g).tolist()
            out.append(lf.Example(name, toks[:-1], toks[1:], w, **kw))
    return out
