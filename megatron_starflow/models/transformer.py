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
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from megatron_starflow.config import ParallelConfig


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


@dataclass
class KVCache:
    """Keys and values per layer, ``[S, B, heads, head_dim]`` (megatron's sequence-first layout)."""

    keys: dict[int, torch.Tensor] = field(default_factory=dict)
    values: dict[int, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return 0 if not self.keys else next(iter(self.keys.values())).shape[0]

    def truncate(self, length: int) -> None:
        for store in (self.keys, self.values):
            for layer in store:
                store[layer] = store[layer][:length]

    def clone(self) -> "KVCache":
        return KVCache(dict(self.keys), dict(self.values))


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
            if state is not None:
                past_k = state.cache.keys.get(self.layer_number)
                if past_k is not None:
                    key = torch.cat([past_k, key], dim=0)
                    value = torch.cat([state.cache.values[self.layer_number], value], dim=0)
                if state.commit:
                    state.cache.keys[self.layer_number] = key
                    state.cache.values[self.layer_number] = value
            q, k, v = (t.permute(1, 2, 0, 3) for t in (query, key, value))
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

    def forward(self, hidden: torch.Tensor, allowed: torch.Tensor, angles: torch.Tensor,
                cache: KVCache | None = None, commit: bool = False,
                first_layer_allowed: torch.Tensor | None = None) -> torch.Tensor:
        """``hidden`` [B, S, W]; ``allowed`` [S, S_past + S] (True = attend); ``angles`` [S, d] RoPE
        angles of these S slots; with a cache, keys of earlier slots are read from it (and this
        call's keys appended when ``commit``). ``first_layer_allowed`` replaces ``allowed`` in the
        first layer only."""
        x = hidden.transpose(0, 1).contiguous()
        mask = ~allowed.reshape(1, 1, *allowed.shape[-2:]) if allowed.dim() == 2 else ~allowed
        first = None
        if first_layer_allowed is not None:
            first = ~first_layer_allowed.reshape(1, 1, *first_layer_allowed.shape[-2:])
        freqs = angles.to(x.dtype)[:, None, None, :]
        if not self.sp:
            with self._cached(cache, commit, first):
                out = self.block(x, mask, rotary_pos_emb=freqs)
            return out.transpose(0, 1)
        mc = _megatron()
        cached_before = 0 if cache is None else len(cache)
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
                cache.truncate(cached_before + out.shape[0])
        return out.transpose(0, 1)


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
