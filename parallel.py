"""
How one model spans the ranks of a torchrun job, on torch's own engines only:

    one process         nothing to do
    world > 1           DDP (torch's composable `replicate`, in place: the module keeps its class, names and
                        attributes): every rank holds the whole model; backward averages the gradients over ranks,
                        bucketed, overlapping the backward pass
    --fsdp              FSDP2 (`fully_shard`), per transformer block, then the root (embeddings, final norm, head):
                        each rank holds 1/world of every weight, gradient and AdamW moment; a block's weights are
                        gathered just before its forward (and again in backward) and freed after; gradients are
                        reduce-scattered in fp32

What --fsdp saves: full fine-tuning of LLaDA-8B keeps 16 bytes per parameter (fp32 weight, gradient, two AdamW
moments: 128 GB) plus a frozen fp32 reference policy when beta > 0 (32 GB); on 8 ranks each holds an eighth. With
LoRA the frozen bf16 base (14.9 GiB) is sharded too. `python bench.py --plan --fsdp --world-size 8` prints the plan.

Sampling is the exception: a rollout runs hundreds of forward passes, and gathering every block for each of them
would dominate. `gathered(model)` gathers every weight once, keeps them through the rollout (and the old and
reference passes), and frees them before the update: a rollout batch pays one all-gather per block, not one per
block per forward pass.

Checkpoints with --fsdp are written by torch.distributed.checkpoint (DCP): every rank writes its shards (model and
optimizer state, keyed by parameter name), and a run resumes from them on any number of ranks (2 -> 1, 1 -> 2): DCP
reshards on load. The export gathers the full weights one tensor at a time onto rank 0's CPU (one full copy per
node), into a plain twin of the model (built on the meta device when the model was sharded, so it costs nothing
until then), and writes it as every other export.
"""

import contextlib
import copy
import os
import warnings
import weakref

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict, get_optimizer_state_dict,
                                                     set_model_state_dict, set_optimizer_state_dict)
from torch.distributed.tensor import DTensor

GATHER_ONCE = True  # False: gathered() is a no-op, so each forward pass gathers (bench.py --gather-every-pass)
# A plain (unsharded) twin of each sharded model, on the meta device, for the export (full_model).
_TWINS = weakref.WeakKeyDictionary()


def distribute(model, fsdp, world, device, mixed_bf16=False):
    """Spread `model` over the ranks (module docstring) in place; returns its trainable parameters, which are the
    ones an optimizer must be built on (FSDP2 replaces every parameter with its shard, a DTensor).
    mixed_bf16 (full fine-tuning on a GPU): FSDP2 gathers bf16 copies of the fp32 master weights for compute and
    reduces gradients in fp32. Otherwise every weight computes in its own dtype (LoRA: the bf16 base and the fp32
    adapters), as without --fsdp. A model without trainable parameters (the frozen reference policy) is sharded
    too, and DDP leaves it alone (it has no gradient to average)."""
    trainable = lambda: [p for p in model.parameters() if p.requires_grad]
    if world == 1:
        return trainable()
    if not fsdp:
        if trainable():
            from torch.distributed._composable.replicate import replicate
            replicate(model, device_ids=[device.index] if device.type == "cuda" else None)
        return trainable()
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    # A block returns this call's keys and values (for sample.py's prefix cache); FSDP2 warns that an in-place op on
    # such a view would skip its hooks. Nothing modifies them in place, so the warning is noise.
    warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")
    _TWINS[model] = meta_twin(model)
    mesh = init_device_mesh(device.type, (world,))
    mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16 if mixed_bf16 else None, reduce_dtype=torch.float32)
    for block in model.model.transformer.blocks:
        fully_shard(block, mesh=mesh, mp_policy=mp)
    fully_shard(model, mesh=mesh, mp_policy=mp)
    return trainable()


def meta_twin(model):
    """A copy of `model`'s structure (LoRA wrappers and flags included) whose tensors live on the meta device:
    deepcopy with every parameter and buffer pre-mapped to an empty meta tensor, so nothing is allocated."""
    memo = {id(p): torch.nn.Parameter(torch.empty_like(p, device="meta"), p.requires_grad)
            for p in model.parameters()}
    memo.update({id(b): torch.empty_like(b, device="meta") for b in model.buffers()})
    return copy.deepcopy(model, memo)


def is_sharded(model):
    return model in _TWINS


def local(t):
    """This rank's part of a tensor: its shard for FSDP2's DTensors, the tensor itself otherwise."""
    return t.to_local() if isinstance(t, DTensor) else t


def scalar(t):
    """A reduced scalar as a float (a norm of sharded gradients is a DTensor: full_tensor() finishes the reduction)."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).item()


def nonfinite(model):
    """Names of the weights holding a non-finite value, on every rank alike (a sharded model checks its shards and
    agrees over ranks)."""
    bad = [n for n, t in model.state_dict().items() if t.is_floating_point() and not torch.isfinite(local(t)).all()]
    if not is_sharded(model):
        return bad
    names = [None] * dist.get_world_size()
    dist.all_gather_object(names, bad)
    return sorted({n for part in names for n in part})


@contextlib.contextmanager
def gathered(*models):
    """Inside: every weight of each sharded model is whole on every rank, gathered once, and stays whole through any
    number of forward passes (a rollout, the old and reference passes, validation); on exit the memory is given
    back. For grad-free passes (a backward inside would not reduce-scatter as training does). A no-op for a model
    that is not sharded."""
    from torch.distributed.fsdp import FSDPModule
    mods = [m for model in models if is_sharded(model) and GATHER_ONCE
            for m in model.modules() if isinstance(m, FSDPModule)]
    for m in mods:
        m.set_reshard_after_forward(False)
        m.unshard()
    try:
        yield
    finally:
        for m in mods:
            m.reshard()
            m.set_reshard_after_forward(True)


def full_model(model):
    """The whole model as a plain module, for the export: on rank 0, the sharded weights gathered one tensor at a time
    onto the CPU into the model's meta twin (one full copy per node); None on the other ranks. A model that is not
    sharded is itself."""
    if not is_sharded(model):
        return model
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() != 0:
        return None
    twin = _TWINS[model]
    twin.load_state_dict(sd, assign=True)
    return twin


# -----------------------------------------------------------------------------
# Checkpoints that reshard: torch.distributed.checkpoint


def _state(model, opt, params, best):
    """What a sharded checkpoint holds: the trainable weights (a LoRA run: the adapter; the frozen base is rebuilt
    from --model), the optimizer state, keyed by parameter name, and --keep-best's kept weights."""
    names = {id(p): n for n, p in model.named_parameters()}
    train = {names[id(p)] for p in params}
    state = {"model": {k: v for k, v in get_model_state_dict(model).items() if k in train},
             "optim": get_optimizer_state_dict(model, opt)}
    if best is not None:
        state["best"] = {names[id(p)]: b for p, b in zip(params, best)}
    return state


def save_sharded(path, model, opt, params, best=None):
    """Every rank writes its shards into `path` (a directory that exists on every rank: rundir.atomic_dir)."""
    with _one_process_ok():
        dcp.save(_state(model, opt, params, best), checkpoint_id=path, no_dist=not dist.is_initialized())


def load_sharded(path, model, opt, params, with_best):
    """Restore what save_sharded wrote, on any number of ranks and whether or not this run is sharded: DCP reads
    the parts of every tensor that this rank holds. Returns the kept best weights (a list like params) or None."""
    best = [p.detach().clone() for p in params] if with_best else None
    state = _state(model, opt, params, best)
    with _one_process_ok():
        dcp.load(state, checkpoint_id=path, no_dist=not dist.is_initialized())
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))
    set_optimizer_state_dict(model, opt, state["optim"])
    return [state["best"][n] for n in state["best"]] if with_best else None


@contextlib.contextmanager
def _one_process_ok():
    """DCP warns when it runs without a process group; one process (--fsdp on one rank, or a resume on one) is
    intended here."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        yield


def is_dcp(path):
    return os.path.exists(os.path.join(path, ".metadata"))
