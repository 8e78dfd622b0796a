"""The small compatibility layer that lets megatron-core run on CPU/gloo.

Active only when CUDA is absent (``install()`` is a no-op on a GPU machine, and nothing else in the
package imports these patches). What megatron-core 0.16 assumes and what we substitute:

* Activation recomputation (``tensor_parallel.checkpoint``) saves and restores the CUDA RNG state
  around the recomputed forward via ``random._get_cuda_rng_state`` / ``_set_cuda_rng_state``. On CPU
  there is no CUDA generator: the CPU generator (already saved by megatron alongside) is the one
  that matters, so we return/restore the CPU state instead.
* The CUDA RNG *tracker* (``get_cuda_rng_tracker().add``) seeds CUDA generators; the tracker's
  forks are only used for dropout inside tensor-parallel regions. We keep a CPU state per tracker
  name so ``fork()`` still gives reproducible, rank-dependent streams.

* Sequence parallelism's scratch tensors (the all-gather buffer ``GlobalMemoryBuffer.get_tensor``,
  the mappings' gather / reduce-scatter outputs, the reduce-scattered input grad in
  ``LinearWithGradAccumulationAndAsyncCommunication.backward``) are allocated with
  ``device=torch.cuda.current_device()``. On a torch without CUDA that call can only raise, so we
  make it return the CPU device: those allocations then land where every other tensor is.
* ``dist_checkpointing``'s ``torch_dist`` writer (``filesystem_async.FileSystemWriterAsync.
  preload_tensors``) copies every tensor to CPU with ``non_blocking=True`` and then calls
  ``torch.cuda.synchronize()`` unconditionally, which raises on a torch without CUDA. With no CUDA
  there is no stream to wait for (the copies are synchronous CPU copies), so we make
  ``torch.cuda.synchronize`` a no-op (used by ``training.dist_checkpoint``).

Not patched, because they are CUDA-only by design in megatron-core 0.16 and we do not fake CUDA:
megatron's ``DistributedDataParallel`` allocates its grad buffers with
``device=torch.cuda.current_device()``, and the ``DistributedOptimizer`` accepts only
``torch.cuda.*Tensor`` parameters (a TypeError otherwise). CPU runs use ``parallel.grads`` for the
same reductions (and torch's ZeroRedundancyOptimizer where a sharded optimizer is wanted).

Weights are initialised on CPU by ``TransformerConfig(use_cpu_initialization=True)``, which the
model sets whenever CUDA is absent; core attention is our own SDPA module (no TE, no fused kernels).
"""

from __future__ import annotations

import contextlib

import torch

_INSTALLED = False


def install() -> None:
    global _INSTALLED
    if _INSTALLED or torch.cuda.is_available():
        return
    from megatron.core.tensor_parallel import random as mrandom

    def get_state(device="cuda", clone=False, graph_safe=False):
        return torch.get_rng_state()

    def set_state(new_state, device=-1, graph_safe=False):
        torch.set_rng_state(new_state)

    mrandom._get_cuda_rng_state = get_state
    mrandom._set_cuda_rng_state = set_state

    class CPURNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Same interface as megatron's tracker, with CPU generator states."""

        def add(self, name, seed):
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            outer = torch.get_rng_state()
            torch.manual_seed(seed)
            self.states_[name] = torch.get_rng_state()
            torch.set_rng_state(outer)

        @contextlib.contextmanager
        def fork(self, name=mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    torch.cuda.current_device = lambda: torch.device("cpu")
    from megatron.core import utils as mutils

    def get_tensor(self, tensor_shape, dtype, name, mem_alloc_context=None):
        numel = 1
        for size in tensor_shape:
            numel *= size
        buf = self.buffer.get((name, dtype))
        if buf is None or buf.numel() < numel:
            buf = self.buffer[(name, dtype)] = torch.empty(numel, dtype=dtype)
        return buf[:numel].view(*tensor_shape)

    mutils.GlobalMemoryBuffer.get_tensor = get_tensor

    # Nothing to wait for without CUDA; megatron's checkpoint writer syncs unconditionally.
    torch.cuda.synchronize = lambda device=None: None

    mrandom._CUDA_RNG_STATE_TRACKER = CPURNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True
    _INSTALLED = True
