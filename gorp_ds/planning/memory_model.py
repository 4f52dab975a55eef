"""Per-GPU memory of GORP under DeepSpeed ZeRO-2 and ZeRO-3: named terms, from shapes alone.

Pure Python (no torch, no torch.distributed): ``python -m gorp_ds.planning.memory_model --model 13b
--world 8 --stage 3`` prints the table (``memory_table.py``). Every term is a count of elements on one
rank times bytes per element, with the placement rule it follows:

``weights``
  - ``frozen``: the base model's weights outside the ``full`` targets. Stage 2: whole on every rank.
    Stage 3: DeepSpeed keeps ``ceil(numel / W)`` of each parameter (``ds_tensor``, padded so that the
    partition divides evenly); a parameter of at most ``stage3_param_persistence_threshold`` elements
    is *persistent*: kept whole on every rank, beside its partition.
  - ``full_targets``: the ``full`` targets' bf16 weights: placed like frozen weights (they do not
    require a gradient: DeepSpeed never sees their gradient). Stage 2 whole, stage 3 partitioned.
``full`` (the targets trained with projected Adam, ``gorp_ds.zero.lowrank_targets``)
  - ``low_bits``: the int16 low halves of the fp32 masters (``split_master``), 2 bytes per element
    (bf16 runs only; an fp32 weight is its own master). Stage 2 whole (replicated masters),
    stage 3 sharded by the project's own layer like the bf16 weight: ``ceil(numel / W)``.
  - ``lowrank_grad``: the flat fp32 buffer of every target's ``R`` (``long × k``), all-reduced
    every step: whole on every rank in both stages.
  - ``lowrank_state``: projector (``short × k``) and Adam moments (2 × ``long × k``) in fp32, plus the
    device failure counter (int64); replicated under stage 2, ``ceil(numel / W)`` under stage 3.
``lora`` (LoRA factors, trained through DeepSpeed)
  - ``weights``: bf16. Stage 2: DeepSpeed's flat buffer per param group, ``Σ numel`` rounded up to a
    multiple of ``2 W`` (whole on every rank). Stage 3: partitions ``ceil(numel / W)`` (DeepSpeed's
    contiguous ``lp_param_buffer``) plus the whole tensor for persistent ones (LoRA factors are
    below the default threshold of 1e5 elements, so they stay whole).
  - ``fp32_master``: DeepSpeed's fp32 partition: stage 2 ``padded / W`` per group, stage 3
    ``Σ ceil(numel / W)``.
  - ``grads``: stage 2: the bf16 gradients of every tensor that touches the rank's partition
    (``grads_in_partition``, backward) and, at the step, one group at a time, its partition's
    gradients flattened (a bf16 copy) and cast to fp32. Stage 3: the bf16
    gradient partitions (``grad_partitions_flat_buffer``, allocated at start-up) and, at the step, one
    sub-group's partition gradients at a time, flattened and cast to fp32 (``sub_group_size``).
  - ``optimizer_state``: Adam's two fp32 moments. AdamW (plain DeepSpeed): ``2 ×`` the fp32
    partition. GORP under stage 2: the whole tensor's moments for every tensor touching the rank's
    partition (``gorp_ds.zero.driver``: a tensor cut by a boundary is updated whole by each
    co-owner). GORP under stage 3: every LoRA tensor is cut (per-parameter partitions), so each rank
    is assumed to hold whole moments of all of them (an upper bound; the factors are small).
``shared``: the shared spaces S, fp32 ``d × s`` per protected tensor (``d``: its long side for
  ``full``, the input side for ``lora_a``, the output side for ``lora_b``); after ``tasks`` finished
  tasks ``s ≤ tasks · rank of the moment`` (``k`` for ``full``, ``r`` for LoRA), capped at ``d − 1``:
  the worst case is assumed. Placed like the tensor's optimizer state. Held twice: the per-name
  bases (what checkpoints save) and, for the update, each batch's zero-padded ``(B, d, s_max)``
  stack (``gorp_ds.optim.stacks``; as large as the bases when the members' ``s`` agree).
``deepspeed`` (buffers)
  - ``reduce_buckets``: stage 2: ``reduce_bucket_size`` elements of bf16, twice with
    ``overlap_comm`` (allocated at the first gradient of a step). Stage 3: once per gradient dtype,
    allocated at start-up.
  - ``gathered_params`` (stage 3): the working set of all-gathered parameters: the largest unit
    fetched at once (a decoder layer, the embedding or the LM head, persistent tensors excluded)
    plus ``stage3_prefetch_bucket_size`` prefetched elements, capped by
    ``stage3_max_live_parameters``. An estimate of DeepSpeed's fetch schedule, not an exact count.
    None on one GPU: there the partition is the parameter, and DeepSpeed gathers nothing.
``activations`` (an estimate for HF LLaMA in bf16, SDPA attention, ``t = micro_batch · seq`` tokens)
  - ``checkpoints``: with gradient checkpointing, every decoder layer's input (``2 t h`` bytes each).
  - ``layer``: what one decoder layer saves for backward (``t·(26h + 8·kv_dim + 8i)`` bytes: RMSNorm's
    fp32 input and bf16 product, q/k after RoPE with their rotated halves, v, attention output and
    its transposed copy, the MLP's gate, SiLU, up and product; ``2r`` per token per LoRA module),
    and the backward's temporaries (``t·(6i + 4h)``: the MLP's three ``t × i`` gradients). With
    checkpointing one layer at a time (recomputed), without all ``L``.
  - ``logits``: the LM head's bf16 logits, their fp32 upcast and ``log_softmax`` output in the
    loss, and in backward the fp32 gradient: ``12 t V`` bytes at the head's backward.
  - ``refresh``: a projector refresh's workspace: the sketch (``(m + n)·(k + oversample)`` fp32
    products, a few at a time) or, with ``refresh_from="gradient"``, one fp32 ``m × n`` gradient.

The peak is what stays allocated all the time (weights, states, start-up buffers) plus the largest
of the phases, which do not coexist: the head's forward and backward (logits), a decoder layer's
backward (its activations; stage 2's reduce buckets exist from the first LoRA gradient on), the
optimizer step (fp32 partition gradients, the split-master update's ``m × n`` fp32 product and its two
bf16/int16 outputs for one target).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

GIB = 2**30
DTYPE_BYTES = {"bf16": 2, "fp32": 4}


@dataclass(frozen=True)
class ModelShape:
    """A LLaMA decoder's shape (the fields of a HF ``LlamaConfig`` that memory depends on)."""

    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    vocab: int
    tie_embeddings: bool = False

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * (self.hidden // self.heads)

    @classmethod
    def from_config(cls, config, name: str = "custom") -> ModelShape:
        """From a ``transformers.LlamaConfig`` (or anything with its attribute names)."""
        return cls(name, config.hidden_size, config.intermediate_size, config.num_hidden_layers,
                   config.num_attention_heads, config.num_key_value_heads or config.num_attention_heads,
                   config.vocab_size, bool(getattr(config, "tie_word_embeddings", False)))


MODELS = {
    "7b": ModelShape("LLaMA-2-7B", 4096, 11008, 32, 32, 32, 32000),
    "13b": ModelShape("LLaMA-2-13B", 5120, 13824, 40, 40, 40, 32000),
    "70b": ModelShape("LLaMA-2-70B", 8192, 28672, 80, 64, 8, 32000),
}


@dataclass(frozen=True)
class GorpShape:
    """What trains, and how (GORP's defaults; ``optimizer="adamw"`` models plain DeepSpeed with a
    torch AdamW over the LoRA factors and the ``full`` targets' full gradients)."""

    lora_rank: int = 8
    lora_targets: tuple[str, ...] = ("q_proj", "v_proj")
    full_targets: tuple[str, ...] = ("gate_proj",)
    rank: int = 8  # k
    oversample: int = 8
    tasks: int = 0  # finished tasks: S has at most tasks·rank columns per tensor
    refresh_from: str = "sketch"
    optimizer: str = "gorp"  # or "adamw"


@dataclass(frozen=True)
class ZeroShape:
    """The DeepSpeed side: ZeRO stage, data-parallel world size and the buffer settings."""

    stage: int
    world: int
    reduce_bucket_size: int = 500_000_000
    overlap_comm: bool = True
    contiguous_gradients: bool = True
    prefetch_bucket_size: int = 50_000_000
    param_persistence_threshold: int = 100_000
    model_persistence_threshold: int = 2**63 - 1
    max_live_parameters: int = 1_000_000_000
    sub_group_size: int = 1_000_000_000

    @classmethod
    def from_ds_config(cls, config: dict, world: int) -> ZeroShape:
        """The fields of a DeepSpeed config's ``zero_optimization`` section (DeepSpeed's defaults)."""
        zero = config.get("zero_optimization") or {}
        keys = {"reduce_bucket_size": "reduce_bucket_size", "overlap_comm": "overlap_comm",
                "contiguous_gradients": "contiguous_gradients", "sub_group_size": "sub_group_size",
                "stage3_prefetch_bucket_size": "prefetch_bucket_size",
                "stage3_param_persistence_threshold": "param_persistence_threshold",
                "stage3_model_persistence_threshold": "model_persistence_threshold",
                "stage3_max_live_parameters": "max_live_parameters"}
        stage = zero.get("stage", 0)
        if isinstance(stage, bool) or not isinstance(stage, int):
            raise ValueError(f"zero_optimization.stage is {stage!r}; expected 2 or 3")
        defaults, values = cls(stage, world), {}
        for theirs, ours in keys.items():
            if theirs not in zero:
                continue
            kind, value = type(getattr(defaults, ours)), zero[theirs]
            if isinstance(value, bool) != (kind is bool) or not isinstance(value, (int, float)):
                raise ValueError(f"zero_optimization.{theirs} is {value!r}; expected a "
                                 f"{'boolean' if kind is bool else 'number'} (the memory model needs the value itself)")
            values[ours] = kind(value)
        if stage == 3 and "overlap_comm" not in zero:
            values["overlap_comm"] = True  # DeepSpeed's stage-3 default
        if stage == 2 and "overlap_comm" not in zero:
            values["overlap_comm"] = False
        return cls(stage, world, **values)


@dataclass(frozen=True)
class RunShape:
    micro_batch: int = 4
    seq: int = 1024
    checkpointing: bool = True
    dtype: str = "bf16"


@dataclass(frozen=True)
class TensorSpec:
    """One parameter of the (PEFT-wrapped) model, in ``named_parameters`` order."""

    name: str
    shape: tuple[int, ...]
    kind: str  # "frozen", "full", "lora_a" or "lora_b"
    layer: int  # decoder layer, -1 outside the layers

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


def tensor_specs(model: ModelShape, gorp: GorpShape) -> list[TensorSpec]:
    """Every parameter of a PEFT-LoRA LlamaForCausalLM, in the order ``named_parameters`` lists them."""
    h, i, kv = model.hidden, model.intermediate, model.kv_dim
    specs = [TensorSpec("model.embed_tokens", (model.vocab, h), "frozen", -1)]
    linears = [("self_attn.q_proj", (h, h)), ("self_attn.k_proj", (kv, h)), ("self_attn.v_proj", (kv, h)),
               ("self_attn.o_proj", (h, h)), ("mlp.gate_proj", (i, h)), ("mlp.up_proj", (i, h)),
               ("mlp.down_proj", (h, i))]
    for layer in range(model.layers):
        prefix = f"model.layers.{layer}."
        for module, (out_features, in_features) in linears:
            short = module.split(".")[-1]
            kind = "full" if short in gorp.full_targets else "frozen"
            specs.append(TensorSpec(prefix + module, (out_features, in_features), kind, layer))
            if short in gorp.lora_targets:
                specs.append(TensorSpec(prefix + module + ".lora_A", (gorp.lora_rank, in_features), "lora_a", layer))
                specs.append(TensorSpec(prefix + module + ".lora_B", (out_features, gorp.lora_rank), "lora_b", layer))
        for norm in ("input_layernorm", "post_attention_layernorm"):
            specs.append(TensorSpec(prefix + norm, (h,), "frozen", layer))
    specs.append(TensorSpec("model.norm", (h,), "frozen", -1))
    if not model.tie_embeddings:
        specs.append(TensorSpec("lm_head", (model.vocab, h), "frozen", -1))
    return specs


# ---------------------------------------------------------------------------------------- placement rules
def stage2_group(numels: list[int], world: int) -> tuple[int, list[int]]:
    """DeepSpeed ZeRO-1/2's flat buffer of one param group: ``(partition size, tensor offsets)``.
    Tensors back to back, the total padded to a multiple of ``2 · world`` (4-byte alignment of 16-bit
    elements per rank); rank ``r`` owns ``[r·P, (r+1)·P)``."""
    offsets, total = [], 0
    for numel in numels:
        offsets.append(total)
        total += numel
    alignment = 2 * world
    padded = -(-total // alignment) * alignment
    return padded // world, offsets


def stage2_touching(numels: list[int], world: int, rank: int) -> list[int]:
    """Positions of the tensors of a ZeRO-2 group that overlap ``rank``'s partition."""
    size, offsets = stage2_group(numels, world)
    start, end = rank * size, (rank + 1) * size
    return [j for j, (offset, numel) in enumerate(zip(offsets, numels)) if max(offset, start) < min(offset + numel, end)]


def stage3_partition(numel: int, world: int) -> int:
    """DeepSpeed ZeRO-3's partition of one parameter: padded to a multiple of ``world``."""
    return -(-numel // world)


def persistent(specs: list[TensorSpec], zero: ZeroShape) -> set[str]:
    """Parameters ZeRO-3 keeps whole on every rank (small ones, in model order, within the budget)."""
    kept, budget = set(), zero.model_persistence_threshold // zero.world
    used = 0
    for spec in specs:
        if spec.numel <= zero.param_persistence_threshold and used + spec.numel <= budget:
            kept.add(spec.name)
            used += spec.numel
    return kept


def sub_groups(partitions: list[int], size: int) -> list[int]:
    """ZeRO-3 sub-groups of one param group: consecutive tensors until ``size`` elements (their
    partitions' sums)."""
    sums, current = [], 0
    for j, numel in enumerate(partitions):
        current += numel
        if current >= size or j == len(partitions) - 1:
            sums.append(current)
            current = 0
    return sums


def shared_columns(spec: TensorSpec, gorp: GorpShape) -> tuple[int, int]:
    """``(d, s)`` of the worst-case S of a protected tensor after ``gorp.tasks`` tasks."""
    if spec.kind == "full":
        d, moment_rank = max(spec.shape), gorp.rank
    elif spec.kind == "lora_a":
        d, moment_rank = spec.shape[1], spec.shape[0]
    else:
        d, moment_rank = spec.shape[0], spec.shape[1]
    return d, min(gorp.tasks * moment_rank, d - 1)


# ---------------------------------------------------------------------------------------- terms
@dataclass(frozen=True)
class Term:
    """``numel`` elements of ``element_bytes`` each, on one rank; ``phase`` says when they exist."""

    name: str
    numel: int
    element_bytes: int
    phase: str  # "always", or the transient phases it lives in: "head", "layer", "step", joined by "+"
    rule: str = ""

    @property
    def bytes(self) -> int:
        return self.numel * self.element_bytes


PHASES = ("head", "layer", "step")


@dataclass(frozen=True)
class Prediction:
    terms: list[Term] = field(default_factory=list)

    def numel(self, name: str) -> int:
        return sum(t.numel for t in self.terms if t.name == name)

    def bytes_of(self, prefix: str) -> int:
        return sum(t.bytes for t in self.terms if t.name == prefix or t.name.startswith(prefix + "."))

    @property
    def always(self) -> int:
        return sum(t.bytes for t in self.terms if t.phase == "always")

    def phase(self, phase: str) -> int:
        return sum(t.bytes for t in self.terms if phase in t.phase.split("+"))

    @property
    def peak_phase(self) -> str:
        return max(PHASES, key=self.phase)

    @property
    def peak(self) -> int:
        return self.always + self.phase(self.peak_phase)


def predict(model: ModelShape, gorp: GorpShape, zero: ZeroShape, run: RunShape, rank: int = 0) -> Prediction:
    """The memory terms of ``rank`` (ranks differ only in which ZeRO-2 tensors touch their partition)."""
    if zero.stage not in (2, 3):
        raise ValueError(f"memory model: ZeRO stage {zero.stage}; stages 2 and 3 are modelled")
    if not 0 <= rank < zero.world:
        raise ValueError(f"memory model: rank {rank} outside world size {zero.world}")
    w, st3, dbytes = zero.world, zero.stage == 3, DTYPE_BYTES[run.dtype]
    specs = tensor_specs(model, gorp)
    kept = persistent(specs, zero) if st3 else set()
    lora = [s for s in specs if s.kind in ("lora_a", "lora_b")]
    full = [s for s in specs if s.kind == "full"]
    adamw = gorp.optimizer == "adamw"
    # What DeepSpeed trains, in its param groups (``build_param_groups``' lora_a, lora_b, full): GORP
    # keeps the ``full`` targets outside it (projected); AdamW trains them from full gradients.
    ds_groups = [[s for s in lora if s.kind == "lora_a"], [s for s in lora if s.kind == "lora_b"]]
    if adamw:
        ds_groups.append(full)
    ds_groups = [g for g in ds_groups if g]
    trainable = {s.name for g in ds_groups for s in g}
    terms: list[Term] = []

    def add(name: str, numel: int, element_bytes: int, phase: str = "always", rule: str = "") -> None:
        terms.append(Term(name, int(numel), element_bytes, phase, rule))

    # ---- weights outside DeepSpeed's trainable set
    for label, kind in (("weights.frozen", "frozen"), ("weights.full_targets", "full")):
        chosen = [s for s in specs if s.kind == kind and s.name not in trainable]
        if st3:
            add(label, sum(stage3_partition(s.numel, w) for s in chosen), dbytes, rule="ceil(numel/W) each")
            add(label + ".persistent", sum(s.numel for s in chosen if s.name in kept), dbytes,
                rule="whole, numel <= stage3_param_persistence_threshold")
        else:
            add(label, sum(s.numel for s in chosen), dbytes, rule="whole on every rank")

    # ---- DeepSpeed's trainable tensors (LoRA; and full targets under AdamW)
    group_parts = [[stage3_partition(s.numel, w) for s in g] for g in ds_groups]
    if st3:
        partitions = sum(sum(p) for p in group_parts)
        add("ds.bf16_params", partitions, dbytes, rule="lp_param_buffer: ceil(numel/W) each")
        add("ds.bf16_params.persistent", sum(s.numel for g in ds_groups for s in g if s.name in kept), dbytes,
            rule="whole, persistent")
        add("ds.fp32_master", partitions, 4, rule="Σ ceil(numel/W)")
        add("ds.grad_partitions", partitions, dbytes, rule="grad_partitions_flat_buffer")
        largest = max((s for p in group_parts for s in sub_groups(p, zero.sub_group_size)), default=0)
        # At the step, one sub-group at a time: its gradients flattened (bf16) and cast to fp32.
        add("ds.fp32_grad_subgroup", largest, 4 + dbytes if dbytes == 2 else 4, "step",
            rule="largest sub-group's partition, flattened + fp32")
    else:
        flat = [stage2_group([s.numel for s in g], w) for g in ds_groups]
        add("ds.bf16_params", sum(size * w for size, _ in flat), dbytes, rule="Σ numel padded to 2W, whole")
        add("ds.fp32_master", sum(size for size, _ in flat), 4, rule="padded/W per group")
        touching = [[g[j] for j in stage2_touching([s.numel for s in g], w, rank)] for g in ds_groups]
        add("ds.grads_in_partition", sum(s.numel for t in touching for s in t), dbytes, "layer+step",
            rule="whole numel of the tensors touching the partition")
        # At the step, one group at a time: its partition's gradients flattened (a bf16 copy), cast to fp32.
        add("ds.fp32_grad_partition", max((size for size, _ in flat), default=0), 4 + dbytes if dbytes == 2 else 4,
            "step", rule="largest group's partition, flattened + fp32")
    # Optimizer state of DeepSpeed's tensors.
    if adamw:
        fp32 = next(t.numel for t in terms if t.name == "ds.fp32_master")
        add("optimizer.adam_moments", 2 * fp32, 4, rule="exp_avg, exp_avg_sq of the fp32 partition")
        held_lora: list[TensorSpec] = []
    else:
        if st3:
            held_lora = lora  # every tensor is cut across all ranks: whole moments on each (upper bound)
        else:
            held_lora = [g[j] for g in ds_groups for j in stage2_touching([s.numel for s in g], w, rank)]
        add("lora.adam_moments", 2 * sum(s.numel for s in held_lora), 4,
            rule="whole exp_avg, exp_avg_sq per held tensor")

    # ---- GORP's full targets (projected gradients, outside DeepSpeed)
    if full and not adamw:
        k, long_k = gorp.rank, sum(max(s.shape) * gorp.rank for s in full)
        share = (lambda n: stage3_partition(n, w)) if st3 else (lambda n: n)
        if run.dtype == "bf16":
            add("full.low_bits", sum(share(s.numel) for s in full), 2,
                rule="int16 low halves of the fp32 masters" + (", ceil(numel/W)" if st3 else ", whole"))
        add("full.lowrank_grad", long_k, 4, rule="R: Σ long·k, all-reduced, whole")
        add("full.lowrank_state", sum(share(min(s.shape) * k + 2 * max(s.shape) * k) for s in full), 4,
            rule="projector short·k + moments 2·long·k" + (", /W" if st3 else ", whole"))
        add("full.failure_counters", len(full) if not st3 else -(-len(full) // w), 8)
        shared_full = sum(share(math.prod(shared_columns(s, gorp))) for s in full)
        add("shared.full", shared_full, 4, rule="d·s per target, s = min(tasks·k, d−1)")
        add("shared.full.stacked", shared_full, 4, rule="the step's zero-padded (B, d, s_max) copy of S")
        biggest = max(full, key=lambda s: s.numel)
        m, n = biggest.shape
        if gorp.refresh_from == "gradient":
            add("refresh.workspace", m * n, 4, "layer", rule="one fp32 m×n gradient")
        else:
            add("refresh.workspace", 3 * (m + n) * (k + gorp.oversample), 4, "layer", rule="sketch products")
        # The split-master update of one target: the fp32 GEMM product and the new bf16 and int16 halves.
        add("step.split_master_update", share(m * n), 4 + (4 if run.dtype == "bf16" else 0), "step",
            rule="fp32 product + new bf16/int16 halves of one target")
    if not adamw:
        shared_lora = sum(math.prod(shared_columns(s, gorp)) for s in held_lora)
        add("shared.lora", shared_lora, 4, rule="d·s per held tensor, s = min(tasks·r, d−1)")
        add("shared.lora.stacked", shared_lora, 4, rule="the step's zero-padded (B, d, s_max) copy of S")

    # ---- DeepSpeed buffers
    if st3:
        add("ds.reduce_bucket", zero.reduce_bucket_size if zero.contiguous_gradients else 0, dbytes,
            rule="reduce_bucket_size, allocated at start-up")
        # Fetched together: a decoder layer (all alike: layer 0's), the embedding, the LM head.
        layer_unit = sum(s.numel for s in specs if s.layer == 0 and s.name not in kept)
        outer = [s.numel for s in specs if s.layer == -1 and s.name not in kept]
        head_unit = outer[-1] if outer else 0  # the LM head (the embedding when tied)
        # On one rank the partition is the whole parameter: DeepSpeed points the parameter at it, no gather.
        live = zero.max_live_parameters if w > 1 else 0
        add("ds.gathered_params", min(live, max([layer_unit, *outer]) + zero.prefetch_bucket_size), dbytes, "layer",
            rule="largest fetch unit + prefetch bucket, capped by max_live_parameters (none on 1 GPU)")
        add("ds.gathered_params.head", min(live, head_unit + zero.prefetch_bucket_size), dbytes, "head",
            rule="LM head + prefetch bucket (none on 1 GPU)")
    else:
        buffers = (2 if zero.overlap_comm else 1) if zero.contiguous_gradients else 0
        add("ds.reduce_buckets", buffers * zero.reduce_bucket_size, dbytes, "layer",
            rule="reduce_bucket_size, x2 with overlap_comm, from the first gradient")

    # ---- activations
    h, i, t, kv = model.hidden, model.intermediate, run.micro_batch * run.seq, model.kv_dim
    lora_modules = len(gorp.lora_targets)
    layer_saved = t * (26 * h + 8 * kv + 8 * i + 2 * gorp.lora_rank * lora_modules)
    temporaries = t * (6 * i + 4 * h)
    if run.checkpointing:
        add("activations.checkpoints", model.layers * t * h, dbytes, "layer", rule="every layer's input")
        add("activations.checkpoints.head", model.layers * t * h, dbytes, "head")
        add("activations.layer", layer_saved + temporaries, 1, "layer", rule="one recomputed layer + temporaries")
        add("activations.final_norm", 8 * t * h, 1, "head")
    else:
        add("activations.layer", model.layers * layer_saved + temporaries, 1, "layer", rule="all layers")
        add("activations.layers.head", model.layers * layer_saved + 8 * t * h, 1, "head")
    add("activations.logits", 12 * t * model.vocab, 1, "head", rule="bf16 logits, fp32 upcast/log_softmax/grad")
    return Prediction(terms)


def worst_rank(model: ModelShape, gorp: GorpShape, zero: ZeroShape, run: RunShape) -> Prediction:
    """The rank with the largest peak (ZeRO-2 ranks differ by the LoRA tensors touching their
    partition; only the first ranks are scanned at large world sizes: they differ by a few KiB)."""
    ranks = range(min(zero.world, 8))
    return max((predict(model, gorp, zero, run, r) for r in ranks), key=lambda p: p.peak)


if __name__ == "__main__":
    from .memory_table import main

    main()
