"""Name <-> weights exchange and the PEFT / vLLM / SGLang file formats."""

from .weights import AdapterWeights, ExpertsArch

__all__ = ["AdapterWeights", "ExpertsArch"]
