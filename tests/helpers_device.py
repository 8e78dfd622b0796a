"""A non-CPU device without a GPU, to catch device bugs on a CPU-only machine.

torch's lazy TorchScript backend (``torch._lazy``) is a device of its own (``lazy``) that computes
on the CPU: modules and tensors move to it with ``.to``, backward and ``.item()`` work, and an op
that mixes a lazy tensor with a CPU tensor raises ``Input tensor is not a lazy tensor``. So a
``torch.zeros(...)`` created without ``device=`` and mixed into the model fails there exactly as it
would on CUDA (``Expected all tensors to be on the same device``).

Two gaps of the backend, and what we do about them:
* it has no random generator (``torch.Generator(device="lazy")`` raises): the package draws every
  random input from CPU generators and moves it (the same draws on any device), so nothing is
  needed; a draw from a CPU generator straight into a device tensor, which CUDA refuses and the
  lazy backend silently allows, is caught by ``GeneratorDeviceCheck``;
* torch 2.13's functionalised lazy backend has no kernel for the copy forms of ``split``,
  ``split_with_sizes`` and ``unbind`` (``torch.split`` / ``chunk`` / ``unbind`` of a lazy tensor
  give outputs that cannot be combined with any other lazy tensor). ``use_lazy_device`` registers
  ones built from ``slice_copy`` / ``select_copy`` for the Lazy dispatch key: the same values,
  only for this test device.

Megatron-core's layers (ColumnParallel/RowParallel linears, TransformerBlock, RoPE) run on it
unchanged.
"""

from __future__ import annotations

import functools

import torch


def _split_with_sizes_copy(self, split_sizes, dim=0):
    out, start = [], 0
    for size in split_sizes:
        out.append(torch.ops.aten.slice_copy.Tensor(self, dim, start, start + size, 1))
        start += size
    return out


def _split_copy(self, split_size, dim=0):
    n = self.shape[dim]
    sizes = [min(split_size, n - s) for s in range(0, n, split_size)] if n else [0]
    return _split_with_sizes_copy(self, sizes, dim)


def _unbind_copy(self, dim=0):
    return [torch.ops.aten.select_copy.int(self, dim, i) for i in range(self.shape[dim])]


@functools.lru_cache(maxsize=None)
def use_lazy_device() -> torch.device:
    """Initialise the lazy TorchScript backend (once per process) -> ``torch.device("lazy")``."""
    import torch._lazy
    import torch._lazy.ts_backend

    torch._lazy.ts_backend.init()
    lib = torch.library.Library("aten", "IMPL")
    lib.impl("split_with_sizes_copy", _split_with_sizes_copy, "Lazy")
    lib.impl("split_copy.Tensor", _split_copy, "Lazy")
    lib.impl("unbind_copy.int", _unbind_copy, "Lazy")
    use_lazy_device.library = lib  # registrations live as long as the library object
    return torch.device("lazy")


class GeneratorDeviceCheck:
    """Torch-function mode (a context manager): a random draw made with an explicit ``generator=``
    whose result lands on another device type than the generator's raises, as CUDA does
    (``Expected a 'cuda' device type for generator``). The lazy backend itself draws such
    mismatches silently on the CPU, so without this check a ``torch.randn(..., generator=cpu_gen,
    device=tokens.device)`` would pass here and fail on a GPU."""

    def __new__(cls):
        from torch.overrides import TorchFunctionMode

        class _Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                gen = kwargs.get("generator")
                if isinstance(gen, torch.Generator) and isinstance(out, torch.Tensor) \
                        and out.device.type != gen.device.type:
                    raise RuntimeError(f"{getattr(func, '__name__', func)}: a draw from a "
                                       f"{gen.device.type} generator into a {out.device.type} "
                                       f"tensor (CUDA refuses this: draw on generator.device, "
                                       f"then move)")
                return out

        return _Mode()
