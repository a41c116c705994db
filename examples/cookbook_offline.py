"""Run tinker-cookbook 0.6.1's ``sl_basic`` / ``rl_basic`` recipes offline against ``lorafleet serve``.

Start the server first (the Qwen-vocabulary debug base, accepting the cookbook's model name)::

    lorafleet serve --base debug:qwen3-qwenvocab --alias Qwen/Qwen3-8B-Base --max-rank 8

then::

    python examples/cookbook_offline.py sl --base-url http://127.0.0.1:8000 --log-path runs/cookbook-sl
    python examples/cookbook_offline.py rl --base-url http://127.0.0.1:8000 --log-path runs/cookbook-rl

The recipes' own datasets (NoRobots, GSM8K) need the hub, so SL trains on the cookbook's bundled
``example_data/conversations.jsonl`` and RL on its built-in arithmetic environment. The
cookbook's ``get_tokenizer("Qwen/Qwen3-8B-Base")`` is pointed at the offline Qwen tokenizer
folder (the same one the server returns as ``get_info.model_data.tokenizer_id``).
"""

from __future__ import annotations

import argparse
import functools
import os
from pathlib import Path

MODEL = "Qwen/Qwen3-8B-Base"  # tinker-cookbook maps it to the plain ``role_colon`` renderer


def register_offline_tokenizer(model_name: str = MODEL) -> str:
    """Make ``tinker_cookbook.tokenizer_utils.get_tokenizer(model_name)`` load the offline Qwen
    tokenizer folder (built and cached on first use); returns the folder."""
    from tinker_cookbook import tokenizer_utils
    from transformers import AutoTokenizer

    from lorafleet.models.qwen_vocab import qwen_tokenizer_dir

    d = str(qwen_tokenizer_dir())
    tokenizer_utils.register_tokenizer(
        model_name, functools.cache(lambda: AutoTokenizer.from_pretrained(d, local_files_only=True)))
    return d


def sl_config(base_url: str, log_path: str, max_steps: int = 3, batch_size: int = 2, lora_rank: int = 4,
              max_length: int = 256, model_name: str = MODEL, **extra):
    import tinker_cookbook
    from tinker_cookbook import model_info
    from tinker_cookbook.recipes import sl_basic
    from tinker_cookbook.renderers import TrainOnWhat
    from tinker_cookbook.supervised.data import FromConversationFileBuilder
    from tinker_cookbook.supervised.types import ChatDatasetBuilderCommonConfig

    common = ChatDatasetBuilderCommonConfig(
        model_name_for_tokenizer=model_name, renderer_name=model_info.get_recommended_renderer_name(model_name),
        max_length=max_length, batch_size=batch_size, train_on_what=TrainOnWhat.ALL_ASSISTANT_MESSAGES)
    data = Path(tinker_cookbook.__file__).parent / "example_data" / "conversations.jsonl"
    builder = FromConversationFileBuilder(common_config=common, file_path=str(data))
    return sl_basic.build_config_blueprint(model_name).apply(
        {"base_url": base_url, "log_path": log_path, "max_steps": max_steps, "lora_rank": lora_rank,
         "dataset_builder": builder, **extra}).make()


def rl_config(base_url: str, log_path: str, max_steps: int = 2, batch_size: int = 2, group_size: int = 4,
              lora_rank: int = 4, max_tokens: int = 8, model_name: str = MODEL, **extra):
    from tinker_cookbook import model_info
    from tinker_cookbook.recipes import rl_basic
    from tinker_cookbook.recipes.math_rl.arithmetic_env import ArithmeticDatasetBuilder

    builder = ArithmeticDatasetBuilder(
        batch_size=batch_size, group_size=group_size, n_batches=max_steps, model_name_for_tokenizer=model_name,
        renderer_name=model_info.get_recommended_renderer_name(model_name))
    return rl_basic.build_config_blueprint(model_name).apply(
        {"base_url": base_url, "log_path": log_path, "max_steps": max_steps, "lora_rank": lora_rank,
         "dataset_builder": builder, "max_tokens": max_tokens, **extra}).make()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("recipe", choices=["sl", "rl"])
    ap.add_argument("--base-url", default="http://127.0.0.1:8000")
    ap.add_argument("--log-path", required=True, help="a new directory (the recipe asks before reusing one)")
    ap.add_argument("--max-steps", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--lora-rank", type=int, default=4)
    a = ap.parse_args(argv)
    os.environ.setdefault("TINKER_API_KEY", "tml-local")  # any tml- key works with a keyless local server
    register_offline_tokenizer()
    if a.recipe == "sl":
        from tinker_cookbook.recipes import sl_basic

        sl_basic.main(sl_config(a.base_url, a.log_path, a.max_steps, a.batch_size, a.lora_rank))
    else:
        from tinker_cookbook.recipes import rl_basic

        rl_basic.main(rl_config(a.base_url, a.log_path, a.max_steps, a.batch_size, lora_rank=a.lora_rank))


if __name__ == "__main__":
    main()
