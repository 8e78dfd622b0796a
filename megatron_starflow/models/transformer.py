"""Transformer stacks built from megatron-core ``ModuleSpec``s, with a KV cache for inversion.

Every stack of the model (shallow blocks, deep block, denoiser) is a megatron-core
``TransformerBlock``: pre-LayerNorm attention with RoPE on q and k, pre-LayerNorm GELU MLP, biases,
as in the authors' blocks. The layers come from a spec, so the parallel issue swaps in Transformer
Engine layers or sets TP/SP sizes without touching the model code.

Tensor parallelism (megatron's ColumnParallel/RowParallel linears, heads split over the TP group)
takes its size from megatron's ``parallel_state`` when a stack is built: under TP each rank holds
heads/tp heads (and its KV cache holds keys of those heads only). Sequence parallelism, the layer
spec and FP8 are arguments of each stack (``parallel.*`` of the config, passed down by the model),
as megatron passes them in a ``TransformerConfig``: under SP the [S, B, W] activations between
layers are split along S, so the stack scatters its input before the block and gathers after it. Everything outside the stacks (flow heads, sos, final norm, text projections)
stays replicated: they are tiny next to the stacks (< 0.3 % of the 7 B preset), and replicated
heads keep the flow's log-det and loss computation local to every rank.

Core attention is our own (``SDPACoreAttention``): torch's scaled-dot-product attention with an
arbitrary boolean mask, which runs on CPU and GPU, and which can read and extend a KV cache. The
cache lives here (and not in megatron's inference context) because inverting a flow needs two
kinds of cached step: a sequential step that commits its keys, and Jacobi iterations that attend
to the cache without committing until the block has converged.

A stack built with the local spec and run without TP, SP, FP8 or autocast takes a fast path
(``TransformerStack._fast_forward``): the same layers computed directly from their parameters,
with fewer operations per layer (fused bias linears, one complex RoPE multiply from a per-layout
table, one mask per call), its float32 CPU linears on oneDNN's GEMM (``cpu_linear``) and long
causal passes attending by runs of rows (``prefix_attention``). Megatron's block stays the path
for everything else; tests keep the two equal in float64 (tests/test_fast_path.py).
"""

from __future__ import annotations

import contextlib
import torch
import torch.nn.functional as F
from torch import nn

from megatron_starflow.config import ParallelConfig
from megatron_starflow.models import cpu_linear, rope
from megatron_starflow.models.prefix_attention import PrefixRuns, prefix_attention


def _megatron():
    # Imported lazily: megatron-core prints warnings on import and the config module must stay light.
    from megatron.core.fusions.fused_bias_dropout import get_bias_dropout_add
    from megatron.core.tensor_parallel import ColumnParallelLinear, RowParallelLinear
    from megatron.core.tensor_parallel.mappings import (
        gather_from_sequence_parallel_region, scatter_to_sequence_parallel_region)
    from megatron.core.transformer.attention import SelfAttention, SelfAttentionSubmodules
    from megatron.core.transformer.enums import AttnMaskType
    from megatron.core.transformer.identity_op import IdentityOp
    from megatron.core.transformer.mlp import MLP, MLPSubmodules
    from megatron.core.transformer.module import MegatronModule
    from megatron.core.transformer.spec_utils import ModuleSpec
    from megatron.core.transformer.transformer_block import TransformerBlock, TransformerBlockSubmodules
    from megatron.core.transformer.transformer_config import TransformerConfig
    from megatron.core.transformer.transformer_layer import TransformerLayer, TransformerLayerSubmodules
    return locals()


class KVCache:
    """Keys and values of the cached slots, per layer, in preallocated buffers
    ``[B, kv_heads, capacity, head_dim]`` written in place (no concatenation per step).

    ``len(cache)`` is the number of committed slots. Every cached pass writes the keys of its S
    slots right after them, at ``[len, len + S)``, and attends to ``[0, len + S)``; the stack then
    commits them (``advance``) or not. Uncommitted keys stay in the buffer until the next pass
    overwrites them, so a Jacobi solver may keep the keys of its last iteration with
    ``commit_written()`` instead of paying one more pass. ``capacity`` (slots) sizes the buffers
    on the first write; they grow (doubling) if a pass would overflow them."""

    def __init__(self, capacity: int = 0):
        self.capacity = int(capacity)
        self.length = 0
        self.written = 0  # slots written after ``length`` by the last pass
        self._k: dict[int, torch.Tensor] = {}
        self._v: dict[int, torch.Tensor] = {}

    def __len__(self) -> int:
        return self.length

    @property
    def layers(self) -> list[int]:
        return list(self._k)

    def _ensure(self, layer: int, like: torch.Tensor, need: int) -> None:
        buf = self._k.get(layer)
        if buf is not None and buf.shape[2] >= need and buf.shape[0] == like.shape[0]:
            return
        cap = max(need, self.capacity, 2 * buf.shape[2] if buf is not None else 0)
        shape = (like.shape[0], like.shape[1], cap, like.shape[3])
        k, v = like.new_empty(shape), like.new_empty(shape)
        if buf is not None:
            if buf.shape[0] != like.shape[0]:
                raise RuntimeError(f"KV cache holds a batch of {buf.shape[0]}, a pass brought "
                                   f"{like.shape[0]}")
            k[:, :, :self.length] = buf[:, :, :self.length]
            v[:, :, :self.length] = self._v[layer][:, :, :self.length]
        self._k[layer], self._v[layer] = k, v

    def write(self, layer: int, key: torch.Tensor, value: torch.Tensor):
        """Keys/values ``[B, kv_heads, S, d]`` of a pass's S slots -> the layer's keys and values
        of slots ``[0, len + S)`` (views of the buffers)."""
        s = key.shape[2]
        end = self.length + s
        self._ensure(layer, key, end)
        k, v = self._k[layer], self._v[layer]
        k[:, :, self.length:end] = key
        v[:, :, self.length:end] = value
        self.written = s
        return k[:, :, :end], v[:, :, :end]

    def advance(self, slots: int) -> None:
        """Commit the first ``slots`` slots written by the last pass."""
        self.length += slots
        self.written = max(0, self.written - slots)

    def commit_written(self) -> None:
        """Commit the slots the last pass wrote (its keys come from that pass's inputs)."""
        self.advance(self.written)

    def get(self, layer: int, lo: int = 0, hi: int | None = None):
        """(keys, values) ``[B, kv_heads, hi - lo, d]`` of committed slots ``[lo, hi)``."""
        hi = self.length if hi is None else hi
        return self._k[layer][:, :, lo:hi], self._v[layer][:, :, lo:hi]

    def append(self, layer: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Write keys/values ``[B, kv_heads, S, d]`` after the committed slots of one layer (call
        ``advance(S)`` once every layer has them)."""
        self.write(layer, key, value)

    def truncate(self, length: int) -> None:
        self.length = min(self.length, length)
        self.written = 0

    def clone(self) -> "KVCache":
        """An independent copy of the committed slots (same capacity)."""
        out = KVCache(self.capacity)
        out.length = self.length
        for layer in self._k:
            out._k[layer] = self._k[layer].clone()
            out._v[layer] = self._v[layer].clone()
        return out


class _CacheState:
    def __init__(self, cache: KVCache, commit: bool):
        self.cache, self.commit = cache, commit


def _core_attention_class():
    mc = _megatron()

    class SDPACoreAttention(mc["MegatronModule"]):
        """Core attention slot of megatron's SelfAttention: q, k, v ``[S, B, heads, d]`` in,
        ``[S, B, heads*d]`` out. Mask convention is megatron's: True = masked out."""

        def __init__(self, config, layer_number, attn_mask_type=None, attention_type="self",
                     attention_dropout=None, softmax_scale=None, cp_comm_type=None,
                     pg_collection=None):
            super().__init__(config=config)
            self.layer_number = layer_number
            self.softmax_scale = softmax_scale
            self.cache_state: _CacheState | None = None
            # A mask for this layer only (megatron convention), e.g. the denoiser's look-ahead
            # that only its first layer may use; None = the block's mask.
            self.mask_override: torch.Tensor | None = None

        def forward(self, query, key, value, attention_mask, attn_mask_type=None,
                    attention_bias=None, packed_seq_params=None):
            if self.mask_override is not None:
                attention_mask = self.mask_override
            state = self.cache_state
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
            if state is not None:
                k, v = state.cache.write(self.layer_number, k, v)
            if k.shape[1] != q.shape[1]:  # grouped-query attention: share kv heads
                k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
                v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
            allowed = None if attention_mask is None else ~attention_mask
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, scale=self.softmax_scale)
            return out.permute(2, 0, 1, 3).reshape(out.shape[2], out.shape[0], -1)

    return SDPACoreAttention


_SDPA = None


def sdpa_core_attention():
    global _SDPA
    if _SDPA is None:
        _SDPA = _core_attention_class()
    return _SDPA


class StackLayerNorm:
    """``torch.nn.LayerNorm`` built from a megatron config, as megatron's ``WrappedTorchNorm``, but
    usable with sequence parallelism: WrappedTorchNorm refuses ``sequence_parallel``. Under SP each
    TP rank normalises only its slice of the sequence, so its weight/bias grads are partial sums;
    the ``sequence_parallel`` attribute is how megatron's ``finalize_model_grads`` (and our
    ``parallel.grads.allreduce_sequence_parallel_grads``) find the params to all-reduce over TP.
    Parameter names (weight, bias) are those of WrappedTorchNorm, so checkpoints are unchanged."""

    def __new__(cls, config, hidden_size: int, eps: float = 1e-5, **unused):
        norm = nn.LayerNorm(hidden_size, eps=eps)
        for param in norm.parameters():
            param.sequence_parallel = bool(config.sequence_parallel)
        return norm


def local_layer_spec():
    """Pure-torch megatron layer: what a CPU run (and the default GPU run) builds."""
    mc = _megatron()
    ModuleSpec = mc["ModuleSpec"]
    return ModuleSpec(
        module=mc["TransformerLayer"],
        submodules=mc["TransformerLayerSubmodules"](
            input_layernorm=StackLayerNorm,
            self_attention=ModuleSpec(
                module=mc["SelfAttention"],
                params={"attn_mask_type": mc["AttnMaskType"].arbitrary},
                submodules=mc["SelfAttentionSubmodules"](
                    linear_qkv=mc["ColumnParallelLinear"],
                    core_attention=sdpa_core_attention(),
                    linear_proj=mc["RowParallelLinear"],
                    q_layernorm=mc["IdentityOp"],
                    k_layernorm=mc["IdentityOp"],
                ),
            ),
            self_attn_bda=mc["get_bias_dropout_add"],
            pre_mlp_layernorm=StackLayerNorm,
            mlp=ModuleSpec(module=mc["MLP"], submodules=mc["MLPSubmodules"](
                linear_fc1=mc["ColumnParallelLinear"], linear_fc2=mc["RowParallelLinear"])),
            mlp_bda=mc["get_bias_dropout_add"],
        ),
    )


TE_UNAVAILABLE = ("parallel.spec=te needs transformer_engine and a CUDA GPU; install "
                  "requirements-gpu.txt on the cluster or use parallel.spec=local")


class SpecUnavailableError(RuntimeError):
    """A layer spec cannot be built on this machine (e.g. ``te`` without TE or CUDA)."""


def te_layer_spec():
    """The same layer with Transformer Engine modules (megatron's TE wrappers): the input norm is
    fused into ``linear_qkv`` (TELayerNormColumnParallelLinear), the pre-MLP norm into
    ``mlp.linear_fc1``, the output projections are TERowParallelLinear. Core attention stays our
    SDPA module: it takes the arbitrary (windowed / look-ahead) boolean masks and owns the KV cache
    that flow inversion needs (TEDotProductAttention would serve training only). FP8 follows the
    stack's TransformerConfig (``fp8``, ``fp8_recipe``; megatron's TransformerBlock enters TE's
    fp8 autocast itself). Parameter names differ from the local spec only in the fused norms;
    ``te_key_map`` / ``local_key_map`` translate state dicts."""
    try:
        import transformer_engine  # noqa: F401
        from megatron.core.extensions.transformer_engine import (TELayerNormColumnParallelLinear,
                                                                 TERowParallelLinear)
    except Exception as exc:  # ImportError, or TE's own errors on a machine without CUDA libraries
        raise SpecUnavailableError(f"{TE_UNAVAILABLE} (import failed: {exc})") from None
    if not torch.cuda.is_available():
        raise SpecUnavailableError(f"{TE_UNAVAILABLE} (no CUDA device)")
    mc = _megatron()
    ModuleSpec = mc["ModuleSpec"]
    return ModuleSpec(
        module=mc["TransformerLayer"],
        submodules=mc["TransformerLayerSubmodules"](
            input_layernorm=mc["IdentityOp"],
            self_attention=ModuleSpec(
                module=mc["SelfAttention"],
                params={"attn_mask_type": mc["AttnMaskType"].arbitrary},
                submodules=mc["SelfAttentionSubmodules"](
                    linear_qkv=TELayerNormColumnParallelLinear,
                    core_attention=sdpa_core_attention(),
                    linear_proj=TERowParallelLinear,
                    q_layernorm=mc["IdentityOp"],
                    k_layernorm=mc["IdentityOp"],
                ),
            ),
            self_attn_bda=mc["get_bias_dropout_add"],
            pre_mlp_layernorm=mc["IdentityOp"],
            mlp=ModuleSpec(module=mc["MLP"], submodules=mc["MLPSubmodules"](
                linear_fc1=TELayerNormColumnParallelLinear, linear_fc2=TERowParallelLinear)),
            mlp_bda=mc["get_bias_dropout_add"],
            # megatron's own TE GPT spec maps the fused norms the same way for dist-checkpoints.
            sharded_state_dict_keys_map={"input_layernorm.": "self_attention.linear_qkv.layer_norm_",
                                         "pre_mlp_layernorm.": "mlp.linear_fc1.layer_norm_"},
        ),
    )


LAYER_SPECS = {"local": local_layer_spec, "te": te_layer_spec}

# Local-spec key fragment -> TE-spec key fragment (names verified in megatron-core 0.16's
# extensions/transformer_engine.py and post_training/modelopt/gpt/state_dict_hooks.py).
_TE_RENAMES = (
    (".input_layernorm.weight", ".self_attention.linear_qkv.layer_norm_weight"),
    (".input_layernorm.bias", ".self_attention.linear_qkv.layer_norm_bias"),
    (".pre_mlp_layernorm.weight", ".mlp.linear_fc1.layer_norm_weight"),
    (".pre_mlp_layernorm.bias", ".mlp.linear_fc1.layer_norm_bias"),
)


def _rename(state: dict, pairs) -> dict:
    out = {}
    for key, value in state.items():
        for old, new in pairs:
            if key.endswith(old):
                key = key[: -len(old)] + new
                break
        if key in out:
            raise KeyError(f"state dict key {key} would be written twice")
        out[key] = value
    return out


def te_key_map(local_state_dict: dict) -> dict:
    """State dict of the local spec -> the names the TE spec uses (the fused layer norms); every
    other key, including ``_extra_state`` entries, is kept as is."""
    return _rename(local_state_dict, _TE_RENAMES)


def local_key_map(te_state_dict: dict) -> dict:
    """Inverse of ``te_key_map``."""
    return _rename(te_state_dict, [(new, old) for old, new in _TE_RENAMES])


def stack_options(parallel: ParallelConfig | None) -> dict:
    """The ``TransformerStack`` settings of ``parallel.*``: layer spec, sequence parallelism, FP8
    and its recipe. None: local spec, no SP, no FP8 (a one-process model)."""
    p = parallel or ParallelConfig()
    return {"spec": p.spec, "sp": p.sp, "fp8": p.fp8, "fp8_recipe": p.fp8_recipe}


def tensor_parallel_size() -> int:
    """TP size of megatron's ``parallel_state`` (1 when it is not initialised)."""
    from megatron.core import parallel_state

    if not parallel_state.model_parallel_is_initialized():
        return 1
    return parallel_state.get_tensor_model_parallel_world_size()


def transformer_config(width: int, layers: int, head_dim: int, mlp_ratio: int, init_std: float,
                       recompute: bool = False, params_dtype=torch.float32, tp: int = 1,
                       sp: bool = False, fp8: str = "none", fp8_recipe: str = "delayed"):
    """The megatron TransformerConfig of one stack, matching the authors' layer: LayerNorm eps 1e-5
    with bias, exact-erf GELU, biases on every linear, no dropout, interleaved RoPE pairs."""
    mc = _megatron()
    return mc["TransformerConfig"](
        num_layers=layers, hidden_size=width, num_attention_heads=width // head_dim,
        kv_channels=head_dim, ffn_hidden_size=mlp_ratio * width, init_method_std=init_std,
        add_bias_linear=True, activation_func=F.gelu, normalization="LayerNorm",
        layernorm_epsilon=1e-5, hidden_dropout=0.0, attention_dropout=0.0,
        rotary_interleaved=True, apply_rope_fusion=False, bias_dropout_fusion=False,
        masked_softmax_fusion=False, gradient_accumulation_fusion=False, persist_layer_norm=False,
        use_cpu_initialization=not torch.cuda.is_available(), params_dtype=params_dtype,
        tensor_model_parallel_size=tp, sequence_parallel=sp,
        recompute_granularity="full" if recompute else None,
        recompute_method="uniform" if recompute else None,
        recompute_num_layers=1 if recompute else None,
        **({"fp8": fp8, "fp8_recipe": fp8_recipe} if fp8 != "none" else {}),
    )


class TransformerStack(nn.Module):
    """A megatron TransformerBlock behind a batch-first interface with boolean masks and RoPE.

    ``spec``, ``sp``, ``fp8`` and ``fp8_recipe`` are ``parallel.*`` of the config
    (``stack_options``); the TP size is megatron's (1 in a plain one-process run), and sequence
    parallelism only takes effect with TP > 1. Sizes that must divide are checked before anything
    is built (``parallel.state.validate_parallel``). The stack's megatron config keeps
    ``pipeline_model_parallel_size = 1`` even when the model is pipelined: our pipeline stages own
    whole flow blocks (``parallel.pipeline``), so megatron must neither split this block's layers
    again nor offset their numbers."""

    def __init__(self, width: int, layers: int, head_dim: int, mlp_ratio: int = 4,
                 init_std: float = 0.02, recompute: bool = False, spec: str = "local",
                 sp: bool = False, fp8: str = "none", fp8_recipe: str = "delayed"):
        super().__init__()
        if spec not in LAYER_SPECS:
            raise ValueError(f"parallel.spec={spec!r} is not available; valid: {', '.join(LAYER_SPECS)}")
        if fp8 != "none" and spec != "te":
            raise ValueError(f"parallel.fp8={fp8} needs parallel.spec=te (FP8 GEMMs are Transformer "
                             f"Engine layers)")
        tp = tensor_parallel_size()
        layer = LAYER_SPECS[spec]()  # raises SpecUnavailableError early for te without TE/CUDA
        mc = _megatron()
        self.config = transformer_config(width, layers, head_dim, mlp_ratio, init_std, recompute,
                                         tp=tp, sp=bool(sp and tp > 1), fp8=fp8,
                                         fp8_recipe=fp8_recipe)
        self.tp, self.sp = tp, self.config.sequence_parallel
        self.spec, self.fp8 = spec, fp8
        self.fast = True  # see uses_fast_path; tests compare it with megatron's block
        self._packs = None
        self.block = mc["TransformerBlock"](
            self.config, mc["TransformerBlockSubmodules"](layer_specs=[layer] * layers),
            post_layer_norm=False)
        self.head_dim = head_dim

    def core_attentions(self):
        """The SDPA core-attention module of every layer (they hold the KV-cache state; context
        parallelism swaps their attention)."""
        return [layer.self_attention.core_attention for layer in self.block.layers]

    @contextlib.contextmanager
    def _cached(self, cache: KVCache | None, commit: bool, first_layer_mask=None):
        state = None if cache is None else _CacheState(cache, commit)
        modules = self.core_attentions()
        for m in modules:
            m.cache_state = state
        modules[0].mask_override = first_layer_mask
        try:
            yield
        finally:
            for m in modules:
                m.cache_state = None
            modules[0].mask_override = None

    def _pad_for_sp(self, x, mask, freqs):
        """Pad the sequence to a multiple of tp for sequence parallelism. Pad slots come last:
        no real query may attend to them (their mask columns are False), they may attend to
        everything (a fully masked row would make SDPA return NaN), their outputs are dropped."""
        pad = (-x.shape[0]) % self.tp
        if not pad:
            return x, mask, freqs, 0
        s, past = x.shape[0], mask.shape[-1] - x.shape[0]
        x = torch.cat([x, x.new_zeros(pad, *x.shape[1:])])
        freqs = torch.cat([freqs, freqs.new_zeros(pad, *freqs.shape[1:])])
        full = torch.zeros(*mask.shape[:-2], s + pad, past + s + pad, dtype=torch.bool,
                           device=mask.device)
        full[..., :s, :past + s] = mask  # megatron convention: True = masked out
        full[..., :s, past + s:] = True
        return x, full, freqs, pad

    def uses_fast_path(self, hidden: torch.Tensor) -> bool:
        """Whether ``forward`` runs the layers itself (``_fast_forward``) instead of through
        megatron's TransformerBlock: a local-spec stack without TP, SP or FP8, outside autocast,
        whose core attention is not patched (context parallelism swaps it)."""
        if not self.fast or self.spec != "local" or self.tp != 1 or self.sp:
            return False
        kind = hidden.device.type  # devices without autocast (torch's lazy test device) have none on
        if torch.amp.is_autocast_available(kind) and torch.is_autocast_enabled(kind):
            return False
        return "forward" not in self.block.layers[0].self_attention.core_attention.__dict__

    def forward(self, hidden: torch.Tensor, allowed: torch.Tensor | None, angles: torch.Tensor,
                cache: KVCache | None = None, commit: bool = False,
                first_layer_allowed: torch.Tensor | None = None,
                rotary: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden`` [B, S, W]; ``allowed`` [S, S_past + S] (True = attend), or None for causal
        attention (every query sees each slot up to its own, cached ones included); ``angles``
        [S, d] RoPE angles of these S slots (``rotary``: the same as ``rope.rotary_factors`` of
        them, precomputed once per layout); with a cache, keys of earlier slots are read from it
        (and this call's keys committed to it when ``commit``). ``first_layer_allowed`` replaces
        ``allowed`` in the first layer only."""
        past = 0 if cache is None else len(cache)
        s = hidden.shape[1]
        if allowed is not None:
            allowed = allowed.to(hidden.device)
        if first_layer_allowed is not None:
            first_layer_allowed = first_layer_allowed.to(hidden.device)
        if self.uses_fast_path(hidden):
            if rotary is None or rotary.device != hidden.device:
                rotary = rope.rotary_factors(angles, hidden.dtype).to(hidden.device)
            out = self._fast_forward(hidden, allowed, rotary, cache, first_layer_allowed)
            if cache is not None and commit:
                cache.advance(s)
            return out
        if allowed is None:
            allowed = torch.ones(s, past + s, dtype=torch.bool, device=hidden.device).tril_(past)
        x = hidden.transpose(0, 1).contiguous()
        mask = ~allowed.reshape(1, 1, *allowed.shape[-2:]) if allowed.dim() == 2 else ~allowed
        first = None
        if first_layer_allowed is not None:
            first = ~first_layer_allowed.reshape(1, 1, *first_layer_allowed.shape[-2:])
        freqs = angles.to(x.dtype)[:, None, None, :]
        if not self.sp:
            with self._cached(cache, commit, first):
                out = self.block(x, mask, rotary_pos_emb=freqs)
            if cache is not None and commit:
                cache.advance(s)
            return out.transpose(0, 1)
        mc = _megatron()
        if first is not None:
            first = self._pad_for_sp(x, first, freqs)[1]
        x, mask, freqs, pad = self._pad_for_sp(x, mask, freqs)
        # Forward: keep this rank's S/tp rows; backward: all-gather the row grads. Inside the block
        # the column-parallel linears all-gather the rows again, so q, k, v (and RoPE, mask and the
        # KV cache) cover the whole (padded) sequence.
        x = mc["scatter_to_sequence_parallel_region"](x)
        with self._cached(cache, commit, first):
            out = self.block(x, mask, rotary_pos_emb=freqs)
        # The flow heads after the stack are replicated: every rank computes the same full grad, so
        # the backward of this gather must split it (not reduce-scatter it).
        out = mc["gather_from_sequence_parallel_region"](out, tensor_parallel_output_grad=False)
        if pad:
            out = out[:-pad]
        if cache is not None and commit:
            cache.advance(s)  # the pad slots written after them are never committed
        return out.transpose(0, 1)

    # -- the fast path ---------------------------------------------------------------------------
    def _fast_forward(self, x, allowed, rotary, cache, first_layer_allowed):
        """The layers of the block computed directly from their parameters, batch-first: the same
        math as megatron's TransformerLayer with the local spec (pre-LN attention with RoPE on q
        and k, bias + residual, pre-LN GELU MLP, bias + residual) in fewer operations: fused
        bias in the linears, both RoPE rotations in one complex multiply with a precomputed table,
        no [S, B] transposes, one additive mask per call (or none: a one-slot query of a causal
        stack sees everything; a square causal pass uses SDPA's causal kernel)."""
        past = 0 if cache is None else len(cache)
        s = x.shape[1]
        attn = _sdpa_mask(allowed, s, past, x.dtype, x.device)
        first = attn if first_layer_allowed is None else _sdpa_mask(first_layer_allowed, s, past,
                                                                    x.dtype, x.device)
        recompute = (self.config.recompute_granularity == "full" and self.training
                     and torch.is_grad_enabled())
        for i, pack in enumerate(self._layer_packs()):
            mask = first if i == 0 else attn
            if recompute:
                x = torch.utils.checkpoint.checkpoint(_fast_layer, pack, x, rotary, mask, None,
                                                      use_reentrant=False)
            else:
                x = _fast_layer(pack, x, rotary, mask, cache)
        return x

    def _layer_packs(self) -> list["_LayerPack"]:
        """Per layer, its parameters and settings as the fast path reads them, gathered once
        (module attribute lookups cost more than a small layer's arithmetic). Parameters are held
        as objects, so in-place updates (optimizer steps, load_state_dict, .to()) show through;
        ``_apply`` (a dtype / device conversion that may replace them) drops the cache."""
        if self._packs is None:
            self._packs = [_LayerPack(layer, self.config, self.head_dim) for layer in self.block.layers]
        return self._packs

    def _apply(self, fn, *args, **kwargs):
        self._packs = None
        return super()._apply(fn, *args, **kwargs)


class _LayerPack:
    __slots__ = ("ln1", "qkv", "proj", "ln2", "fc1", "fc2", "number", "heads", "head_dim",
                 "scale", "activation")

    def __init__(self, layer, config, head_dim: int):
        def norm(m):
            return (m.normalized_shape, m.weight, m.bias, m.eps)

        att, mlp = layer.self_attention, layer.mlp
        self.ln1, self.ln2 = norm(layer.input_layernorm), norm(layer.pre_mlp_layernorm)
        self.qkv = (att.linear_qkv.weight, att.linear_qkv.bias)
        self.proj = (att.linear_proj.weight, att.linear_proj.bias)
        self.fc1 = (mlp.linear_fc1.weight, mlp.linear_fc1.bias)
        self.fc2 = (mlp.linear_fc2.weight, mlp.linear_fc2.bias)
        self.number, self.heads, self.head_dim = layer.layer_number, config.num_attention_heads, head_dim
        self.scale, self.activation = att.core_attention.softmax_scale, config.activation_func


def _fast_layer(p: _LayerPack, x, rotary, mask, cache):
    """One layer of ``TransformerStack._fast_forward`` (x [B, S, W])."""
    b, s, _ = x.shape
    h = torch.layer_norm(x, *p.ln1)
    # split (not narrow / select): its backward is one cat, not a zero-filled qkv-sized buffer per part
    qk, v = cpu_linear.linear(h, *p.qkv).view(b, s, p.heads, 3, p.head_dim).split((2, 1), dim=3)
    q, k = rope.rotate_pairs(qk, rotary[:, None, None]).transpose(1, 2).unbind(3)
    v = v.squeeze(3).transpose(1, 2)  # [B, H, S, d]
    if cache is not None:
        k, v = cache.write(p.number, k, v)
    if isinstance(mask, PrefixRuns):  # query rows in runs that each see a prefix of keys
        o = prefix_attention(q, k, v, mask, p.scale)
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[0], is_causal=mask[1],
                                           scale=p.scale)
    x = x + cpu_linear.linear(o.transpose(1, 2).reshape(b, s, -1), *p.proj)
    h = torch.layer_norm(x, *p.ln2)
    return x + cpu_linear.linear(cpu_linear.linear_gelu(h, *p.fc1, p.activation), *p.fc2)


def _sdpa_mask(allowed, s, past, dtype, device):
    """Boolean mask (True = attend; None = causal over ``past`` cached + ``s`` new slots) -> SDPA's
    (additive mask or None, is_causal), or ``PrefixRuns``, built once per stack call."""
    if allowed is not None and s > 1:
        runs = PrefixRuns.of(allowed)
        if runs is not None:
            return runs
    if allowed is None:
        if s == 1:  # the newest slot sees every cached one
            return None, False
        if past == 0:
            runs = PrefixRuns.causal(s, dtype, device)
            return (None, True) if runs is None else runs
        mask = torch.full((s, past + s), float("-inf"), dtype=dtype, device=device)
        return mask.triu_(past + 1), False
    mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
    return mask.masked_fill_(~allowed, float("-inf")), False


class ZeroCenteredRMSNorm(nn.Module):
    """The authors' final norm: RMSNorm in fp32 with scale (1 + weight), weight zero-initialised,
    eps 1e-6."""

    def __init__(self, width: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(width))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1 + self.weight.to(normed.dtype))).to(x.dtype)
