"""Test-wide settings. One intra-op thread: the fixtures are tiny (threads only add overhead), and
OpenMP spin-waiting makes a 2-thread run on a busy 2-core machine many times slower."""

import torch

torch.set_num_threads(1)

from rollout_helpers import vllm_server  # noqa: E402,F401 - the session's one vLLM server, for any test
