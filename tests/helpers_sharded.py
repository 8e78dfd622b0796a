"""Tiny models and batches shared by the ShardedAdamW tests and their multi-process scripts."""

import torch
from torch import nn


class Tiny(nn.Module):
    """Two groups' worth of parameters, including a 0-d one and rows that split unevenly."""

    def __init__(self, dtype=torch.float32, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.fc1 = nn.Linear(6, 10).to(dtype)
        self.fc2 = nn.Linear(10, 5).to(dtype)
        self.scale = nn.Parameter(torch.tensor(0.7, dtype=dtype))
        self.head = nn.Linear(5, 3).to(dtype)

    def forward(self, x):
        return self.head(torch.tanh(self.fc2(torch.tanh(self.fc1(x)))) * self.scale)


def groups_of(model):
    named = dict(model.named_parameters())
    return [{"name": "flow", "params": [(k, named[k]) for k in ("fc1.weight", "fc1.bias", "fc2.weight",
                                                                 "fc2.bias", "scale")]},
            {"name": "denoiser", "params": [(k, named[k]) for k in ("head.weight", "head.bias")],
             "weight_decay": 0.0}]


def batch(step, dtype, n=8):
    """The global batch of ``step`` (data-parallel ranks take contiguous slices of it)."""
    g = torch.Generator().manual_seed(100 + step)
    return torch.randn(n, 6, generator=g, dtype=dtype), torch.randn(n, 3, generator=g, dtype=dtype)


def loss_fn(model, x, y):
    return ((model(x) - y) ** 2).mean() * 10.0


def reference(dtype, steps, lrs, clip, wd=0.1, betas=(0.9, 0.95), eps=1e-8):
    """torch.optim.AdamW(foreach=False) with per-group clip_grad_norm_ on the whole batch:
    (model, {group: optimizer}, [{group: norm} per step])."""
    model = Tiny(dtype)
    groups = groups_of(model)
    opts = {g["name"]: torch.optim.AdamW([p for _, p in g["params"]], lr=lrs[g["name"]], betas=betas,
                                         eps=eps, weight_decay=g.get("weight_decay", wd), foreach=False)
            for g in groups}
    norms = []
    for s in range(steps):
        for o in opts.values():
            o.zero_grad()
        x, y = batch(s, dtype)
        loss_fn(model, x, y).backward()
        norms.append({g["name"]: float(torch.nn.utils.clip_grad_norm_([p for _, p in g["params"]], clip[g["name"]],
                                                                      foreach=False))
                      for g in groups})
        for o in opts.values():
            o.step()
    return model, opts, norms


class Wide(nn.Module):
    """Row counts divisible by 4 (memory accounting without padding): 1 + 2 groups' worth."""

    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.a = nn.Linear(64, 128).to(dtype)
        self.b = nn.Linear(128, 64).to(dtype)
        self.norm = nn.Parameter(torch.ones(64, dtype=dtype))
