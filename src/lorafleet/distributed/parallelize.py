"""`parallelize(fleet, mesh)`: lay a fleet out over the ranks, from outside the model (the
torchtitan way: model code and LoRA layers stay single-process code).

1. expert parallelism (``expert_parallel_degree > 1``): `expert_parallel.apply_expert_parallel`
   slices the experts and their (slot × expert) LoRA and routes tokens by all-to-all;
2. FSDP2 (``data_parallel_shard_degree > 1``): ``fully_shard`` of the frozen base per decoder
   block, over the shard dim. The LoRA banks are ``ignored_params``: layers skip a bank no row of
   a step uses, so ranks would disagree on which bank tensors have gradients and FSDP's
   reduce-scatter would hang (pytorch #158719); the comm reduces them itself at ``optim_step``.
   Across the replicate dim the shards are replicas: a frozen base has no gradient, so HSDP
   needs no cross-replica traffic and one shard-dim mesh is HSDP;
3. installs the `FleetComm` (``fleet.comm``) that splits batches and reduces gradients.
"""

from __future__ import annotations

import torch

from .data_parallel import FleetComm
from .mesh import Mesh


def parallelize(fleet, mesh: Mesh, *, reshard_after_forward: bool = True) -> FleetComm:
    """Apply the mesh's parallelism to ``fleet`` (in place) and return its comm. Adapters may be
    added before or after; call it once, on every rank, before training."""
    if fleet.comm is not None:
        raise ValueError("this fleet is already parallelized")
    blocks = _decoder_blocks(fleet) if mesh.degrees["dp_shard"] > 1 else None  # check before any collective
    fleet.model.to(mesh.device)
    if mesh.degrees["ep"] > 1:
        if not fleet._att.experts:
            raise ValueError("parallelism: expert_parallel_degree > 1 needs a Mixture-of-Experts base")
        from .expert_parallel import apply_expert_parallel

        apply_expert_parallel(fleet, mesh.group("ep"), mesh.group("dp_replicate", "dp_shard"))
    if blocks is not None:
        apply_fsdp(fleet, mesh, blocks, reshard_after_forward=reshard_after_forward)
    collective = mesh.degrees["ep"] > 1 or mesh.degrees["dp_shard"] > 1
    if collective:
        _every_rank_backpropagates(fleet.model)
    comm = fleet.comm = FleetComm(fleet, mesh, collective_forward=collective)
    return comm


def _decoder_blocks(fleet) -> list[torch.nn.Module]:
    """The decoder layers where `models.structure.discover` found them (``fleet.spec.layers_path``:
    ``model.layers``, ``gpt_neox.layers``, ``transformer.blocks``, ...)."""
    path = fleet.spec.layers_path
    layers = fleet.model.get_submodule(path)
    if not isinstance(layers, torch.nn.ModuleList) or not len(layers):
        raise ValueError(f"parallelism: data_parallel_shard_degree > 1 needs a list of decoder layers; "
                         f"{type(fleet.model).__name__}.{path} is a {type(layers).__name__}")
    return list(layers)


def apply_fsdp(fleet, mesh: Mesh, blocks, reshard_after_forward: bool = True) -> None:
    """``fully_shard`` each decoder block over the shard dim; the backbone is the FSDP root (it
    is what the fleet calls) with its own parameters (embeddings, final norm) left whole, as is
    the LM head: the chunked loss reads ``lm_head.weight`` directly, outside any FSDP forward."""
    from torch.distributed.fsdp import fully_shard

    shard_mesh = mesh.device_mesh["dp_shard"]
    keep_whole = set(fleet.lora_parameters())
    if mesh.degrees["ep"] > 1:  # the experts are already split by expert parallelism
        for m in fleet._att.experts.values():
            keep_whole |= set(m.parameters())
    in_blocks = set()
    for block in blocks:
        params = set(block.parameters())
        in_blocks |= params
        fully_shard(block, mesh=shard_mesh, reshard_after_forward=reshard_after_forward,
                    ignored_params=params & keep_whole)
    backbone = fleet.backbone  # the decoder (Llama 4: the layers' parent, not the whole model)
    fully_shard(backbone, mesh=shard_mesh, reshard_after_forward=reshard_after_forward,
                ignored_params={p for p in backbone.parameters() if p not in in_blocks} | keep_whole)


def _every_rank_backpropagates(model) -> None:
    """The embedding output requires grad, so every rank's backward crosses every block (and its
    FSDP / all-to-all collectives) even when no LoRA on this rank is used before a layer."""
    def hook(module, args, out):
        if torch.is_grad_enabled() and not out.requires_grad:
            out.requires_grad_()
        return out

    model.get_input_embeddings().register_forward_hook(hook)
