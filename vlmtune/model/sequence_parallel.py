"""The model half of sequence parallelism (``--sequence_parallel_size N``): one record's tokens split across a
group of N processes, with DeepSpeed's Ulysses attention between them.

DeepSpeed 0.19's ``UlyssesSPAttentionHF`` does the attention: each rank holds a contiguous chunk of the sequence
for every layer; around attention an all-to-all trades "my chunk, all heads" for "the whole sequence, my heads".
What its data-loader adapter (and accelerate's / the Trainer's ``ParallelismConfig(sp_backend="deepspeed")``,
which drive it) cannot do for a vision-language model is the part before the decoder: they shard ``input_ids``
before the forward and refuse ``pixel_values``, while a Qwen-VL forward needs the whole sequence to place each
image's and video's features at its pad tokens and to compute the 3-D M-RoPE positions. So here:

1. every rank of the group runs the model's own embedding, vision tower, feature placement and 3-D positions on
   the whole batch (the vision tower on every rank: the placement needs every feature at once, the tower is a
   small part of the activations at long lengths, and the result is the single-process computation exactly;
   splitting the media across ranks would need one more all-gather of features, left for when it is measured
   to matter);
2. a forward pre-hook on the language model pads the sequence to a multiple of N and keeps this rank's chunk of
   the embeddings, the positions (as four rows: text positions first, which Ulysses all-gathers for the
   attention kernel) and Qwen3-VL's deepstack mask and features;
3. the decoder runs with Ulysses attention (text attention modules only; the vision tower keeps its own);
4. the labels are shifted on the whole sequence before the split (no target is lost at a chunk boundary), and
   the loss is this chunk's summed token loss over the group's target count, so that the group's losses add up
   to the single-process mean and the gradients summed over the group equal its gradients. A loss on whole
   sequences' log-probabilities (DPO) adds up the chunks' sums over the group with autograd first
   (``group_log_prob_sums``).

Rows of a batch are right-padded, and the decoder attends causally without a mask (Ulysses drops masks), which
is exact for every real token. Packed rows (``--packing``, sdpa): after Ulysses' all-to-all each rank holds the
whole sequence for its heads, and Ulysses all-gathers the text positions, which restart at each record; the
kernel gets the block-diagonal causal mask built from them (``packed_mask``), so records never attend across
their boundaries.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vlmtune.errors import ConfigError, RecordError
from vlmtune.model.load import has_linear_attention

IGNORE_INDEX = -100
SP_MARK = "_vlmtune_sequence_parallel"
"""Attribute set on the language model's attention modules: the attention calls that go through Ulysses."""


@dataclass
class Group:
    """This process's sequence-parallel group: its size, this rank's place in it and the process group."""

    size: int
    rank: int
    process_group: object

    def chunk(self, length: int) -> tuple[int, int, int]:
        """(padded length, start, end) of this rank's chunk of a sequence of ``length`` tokens."""
        padded = -(-length // self.size) * self.size
        step = padded // self.size
        return padded, self.rank * step, (self.rank + 1) * step


def check(size: int, world_size: int, config, model_type: str, packing: bool = False, engine: str | None = None,
          attn_implementation: str | None = None) -> None:
    """Stop with one line when ``--sequence_parallel_size size`` cannot run: a size that does not divide the
    processes or the attention heads, linear-attention layers, packing off sdpa, FSDP (``engine``: the flag of
    the run's engine, ``--deepspeed`` or ``--fsdp``)."""
    if size <= 1:
        return
    flag = f"--sequence_parallel_size {size}"
    if world_size % size:
        raise ConfigError(f"{flag}: the {world_size} processes of this run do not split into groups of {size}; "
                          "launch a multiple of it (torchrun --nproc_per_node)")
    text = config.get_text_config()
    heads, kv_heads = text.num_attention_heads, text.num_key_value_heads
    if heads % size:
        raise ConfigError(f"{flag}: {model_type} has {heads} attention heads, which {size} does not divide; Ulysses "
                          "gives each rank of the group whole heads: pick a divisor of the head count")
    if kv_heads % size and size % kv_heads:
        raise ConfigError(f"{flag}: {model_type} has {kv_heads} key/value heads; Ulysses needs the size to divide "
                          "them or be a multiple of them: pick such a size")
    if has_linear_attention(config):
        raise ConfigError(f"{flag}: {model_type}'s linear-attention (Gated DeltaNet) layers carry a recurrent state "
                          "along the whole sequence, which a split sequence would cut at each chunk boundary; train "
                          "this family without sequence parallelism")
    if packing and attn_implementation not in (None, "sdpa"):
        raise ConfigError(f"{flag} with --packing and --attn_implementation {attn_implementation}: under sequence "
                          "parallelism packed records are kept apart by a block mask built for sdpa; use sdpa")
    if engine == "--fsdp":
        raise ConfigError(f"{flag} with --fsdp: sequence parallelism runs under DDP or DeepSpeed (each group trains "
                          "its batches in turn, which FSDP's gradient reduction is not wired to follow); use "
                          "--deepspeed (ZeRO-2/3) or drop --fsdp")
    if attn_implementation == "eager":
        raise ConfigError(f"{flag} with --attn_implementation eager: Ulysses needs a kernel that masks causally "
                          "without a 4-D mask; use sdpa or flash_attention_2")


def init_group(size: int) -> Group:
    """Split the processes into consecutive groups of ``size`` ranks (DeepSpeed's sequence-parallel groups) and
    return this process's. Needs ``torch.distributed`` started (the Trainer's accelerator starts it)."""
    import deepspeed
    import deepspeed.comm as ds_dist
    import deepspeed.runtime.sequence_parallel.parallel_state_sp as mpu

    if not ds_dist.is_initialized():  # DeepSpeed's collectives wrap the process group torch already has
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend())
    if mpu._SEQUENCE_PARALLEL_GROUP is None:
        mpu.initialize_sequence_parallel(size)
    group = mpu.get_sequence_parallel_group()
    return Group(size, torch.distributed.get_rank(group), group)


def install(model, language_model, group: Group, attn_implementation: str) -> None:
    """Route the language model's attention through Ulysses and split its inputs across ``group``: the model's
    own forward still embeds, places vision features and computes 3-D positions on the whole sequence."""
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    text = model.config.get_text_config()
    core = ALL_ATTENTION_FUNCTIONS[attn_implementation]
    if getattr(core, SP_MARK, False):  # installed before (a second model in the same process)
        core = core.core

    def whole_sequence(module, query, key, value, attention_mask, *args, **kwargs):
        """The kernel Ulysses calls on the whole sequence (this rank's heads): causal, or block-causal when
        the gathered text positions restart (packed records)."""
        return core(module, query, key, value, packed_mask(kwargs.get("position_ids")), *args, **kwargs)

    ulysses = UlyssesSPAttentionHF(
        attn=whole_sequence, batch_size=1, attn_head_count=text.num_attention_heads,
        attn_head_size=getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads,
        kv_head_count=text.num_key_value_heads, num_hidden_layers=text.num_hidden_layers,
        process_group=group.process_group, seq_length_is_variable=True)
    ulysses.core_attn_implementation = attn_implementation

    def attention(module, query, key, value, attention_mask, *args, **kwargs):
        if not getattr(module, SP_MARK, False):  # the vision tower's attention: whole, on every rank
            return core(module, query, key, value, attention_mask, *args, **kwargs)
        _set_batch_size(ulysses, query.shape[0])
        return ulysses(module, query, key, value, None, *args, **kwargs)  # the mask: made in ``whole_sequence``

    attention.core = core
    setattr(attention, SP_MARK, True)
    ALL_ATTENTION_FUNCTIONS[attn_implementation] = attention
    for layer in language_model.layers:
        setattr(layer.self_attn, SP_MARK, True)
    language_model.register_forward_pre_hook(_splitter(group), with_kwargs=True)


def uninstall(group: Group) -> None:
    """Undo ``install`` where it lasts beyond the run: transformers' attention table gets its plain kernels back
    (which drops Ulysses), DeepSpeed's table of all-to-all groups by name (which ``UlyssesSPAttentionHF`` fills
    and nothing in DeepSpeed empties) forgets the group, and ``group`` lets go of its process group."""
    from deepspeed.sequence import layer
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    for name in list(ALL_ATTENTION_FUNCTIONS):
        if getattr(ALL_ATTENTION_FUNCTIONS[name], SP_MARK, False):
            ALL_ATTENTION_FUNCTIONS[name] = ALL_ATTENTION_FUNCTIONS[name].core
    if group.process_group is not None:
        layer._all_to_all_groups.pop(group.process_group.group_name, None)
    group.process_group = None


def packed_mask(positions: torch.Tensor | None) -> torch.Tensor | None:
    """The block-diagonal causal mask (batch, 1, L, L) of packed rows, from the whole sequence's text positions
    (each record's restart at 0, as ``PackedCollator`` writes them); ``None`` (the kernel's own causal mask) when
    no row restarts. The same boundaries transformers' ``create_causal_mask`` finds without the split."""
    if positions is None or positions.ndim != 2 or not bool((positions[:, 1:] == 0).any()):
        return None
    segment = (positions == 0).cumsum(-1)
    length = positions.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=positions.device).tril()
    return ((segment[:, :, None] == segment[:, None, :]) & causal)[:, None]


def _set_batch_size(ulysses, batch: int) -> None:
    """Ulysses fixes the micro-batch size when it is built; the last batch of an epoch may be smaller."""
    if ulysses.batch_size != batch:
        ulysses.batch_size = batch
        ulysses.required_query_shape = torch.Size([1, batch, *ulysses.required_query_shape[2:]])
        ulysses.required_key_value_shape = torch.Size([1, batch, *ulysses.required_key_value_shape[2:]])
        ulysses.required_context_shape = torch.Size([1, batch, *ulysses.required_context_shape[2:]])


def _splitter(group: Group):
    """The language model's forward pre-hook: the whole sequence's inputs in, this rank's chunk out."""

    def split(module, args, kwargs):
        embeds = kwargs["inputs_embeds"]
        batch, length = embeds.shape[:2]
        padded, start, end = group.chunk(length)
        positions = kwargs.get("position_ids")
        if positions is None:
            positions = torch.arange(length, device=embeds.device).expand(3, batch, length)
        elif positions.ndim == 2:
            positions = positions[None].expand(3, batch, length)
        if positions.shape[0] == 3:  # text positions first: Ulysses all-gathers them for the attention kernel
            text = torch.arange(length, device=embeds.device).expand(1, batch, length)
            positions = torch.cat([text.to(positions.dtype), positions])
        kwargs["inputs_embeds"] = _pad(embeds, padded)[:, start:end]
        positions = _pad(positions, padded, dim=2)
        if padded > length:  # padding continues each row's text positions, so the gathered rows stay increasing
            positions[0, :, length:] = positions[0, :, length - 1:length] + torch.arange(
                1, padded - length + 1, device=positions.device)
        kwargs["position_ids"] = positions[:, :, start:end]
        kwargs["attention_mask"] = None  # right-padded rows: causal attention is exact for every real token
        mask = kwargs.get("visual_pos_masks")
        if mask is not None:  # Qwen3-VL's deepstack features: the rows of this chunk's visual tokens
            mask = _pad(mask, padded)
            order = torch.zeros(mask.shape, dtype=torch.long, device=mask.device)
            order[mask] = torch.arange(int(mask.sum()), device=mask.device)
            keep = order[:, start:end][mask[:, start:end]]
            kwargs["visual_pos_masks"] = mask[:, start:end]
            kwargs["deepstack_visual_embeds"] = [e[keep] for e in kwargs["deepstack_visual_embeds"]]
        return args, kwargs

    return split


def _pad(tensor: torch.Tensor, length: int, dim: int = 1) -> torch.Tensor:
    """``tensor`` zero-padded (``False`` for masks) on the right along ``dim`` to ``length``."""
    missing = length - tensor.shape[dim]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[dim] = missing
    return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)


def local_targets(labels: torch.Tensor, group: Group, records: list[str] | None = None) -> torch.Tensor:
    """This rank's chunk of the next-token targets: ``labels`` shifted by one on the whole sequence (so a chunk's
    last token predicts the next chunk's first), padded with ``-100``, then split as the embeddings are."""
    batch, length = labels.shape
    if length < group.size:
        which = f" ({', '.join(records)})" if records else ""
        raise RecordError(f"--sequence_parallel_size {group.size}: a batch of {length} tokens{which} is shorter "
                          "than the group, so a rank would hold no token; use a smaller size for such short data")
    padded, start, end = group.chunk(length)
    shifted = torch.full((batch, padded), IGNORE_INDEX, dtype=labels.dtype, device=labels.device)
    shifted[:, :length - 1] = labels[:, 1:]
    return shifted[:, start:end]


def chunk_loss(logits: torch.Tensor, targets: torch.Tensor, total_targets: int | torch.Tensor) -> torch.Tensor:
    """This chunk's share of the group's mean token loss: its summed cross-entropy over the group's count of
    targets (every rank holds the whole labels, so the count needs no collective)."""
    loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten().to(logits.device),
                                             ignore_index=IGNORE_INDEX, reduction="sum")
    return loss / max(int(total_targets), 1)


def count_targets(labels: torch.Tensor) -> int:
    """How many next-token targets ``labels`` hold (the model's own shift: the first label predicts nothing)."""
    return int((labels[:, 1:] != IGNORE_INDEX).sum())


def group_log_prob_sums(logits: torch.Tensor, targets: torch.Tensor, group: Group) -> torch.Tensor:
    """(rows,) each row's summed log-probability of its next-token targets over the whole sequence: this chunk's
    sums (``targets`` from ``local_targets``), added up over the group with autograd. The sum's backward hands
    each rank's chunk the sum of the group's incoming gradients: a loss that every rank of the group computes
    alike from these sums is to be scaled by 1 / group size before its backward."""
    from torch.distributed.nn.functional import all_reduce

    keep = targets.to(logits.device) != IGNORE_INDEX
    picked = logits.float().log_softmax(-1).gather(-1, targets.to(logits.device).clamp(min=0)[..., None])[..., 0]
    return all_reduce((picked * keep).sum(-1), group=group.process_group)
