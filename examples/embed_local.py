"""Streaming DiLoCo around a plain PyTorch loop: 4 replicas of a small MLP in one process.

    python examples/embed_local.py

Each replica has its own model, AdamW and data; they only meet through their LocalGroup handles.
With a DistributedGroup (one replica per process) the loop is the same, with diloco.step() in
place of step_replicas.
"""

import copy
import hashlib

import torch
from torch import nn

import lowcomm


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 64)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(64, 64), nn.GELU()) for _ in range(4))
        self.out = nn.Linear(64, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = h + b(h)
        return self.out(h)


def main() -> dict:
    """Train, then return what a user checks: each replica's global parameters and the loss."""
    torch.manual_seed(0)
    M, steps = 4, 300
    w_true = torch.randn(8, 1)
    base = Net()
    models = [copy.deepcopy(base) for _ in range(M)]
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3) for m in models]
    groups = lowcomm.LocalGroup.create(M)
    dilocos = [
        lowcomm.DiLoCo(m, o, g, sync_every=30, fragments=4, overlap=1, alpha=0.5, codec="e3m0")
        for m, o, g in zip(models, opts, groups)
    ]
    gens = [torch.Generator().manual_seed(r) for r in range(M)]
    x_val = torch.randn(256, 8)

    def global_loss() -> float:
        with dilocos[0].global_parameters() as m, torch.no_grad():
            return nn.functional.mse_loss(m(x_val), torch.tanh(x_val @ w_true / 3)).item()

    start = global_loss()
    for step in range(1, steps + 1):
        for m, o, gen in zip(models, opts, gens):
            x = torch.randn(32, 8, generator=gen)
            loss = nn.functional.mse_loss(m(x), torch.tanh(x @ w_true / 3))
            loss.backward()
            o.step()
            o.zero_grad()
        lowcomm.step_replicas(dilocos)
        if step % 100 == 0:
            sent = sum(r.bytes_sent for r in dilocos[0].drain_round_stats())
            print(f"step {step}: loss {loss.item():.4f}, replica 0 sent {sent} bytes since the last report")
    lowcomm.finish_replicas(dilocos)
    digests = [hashlib.sha256(d.global_vector().numpy().tobytes()).hexdigest() for d in dilocos]
    end = global_loss()
    print(f"global model loss: {start:.4f} at the start, {end:.4f} at the end")
    print("replicas hold identical global parameters" if len(set(digests)) == 1 else "replicas DIFFER")
    return {"digests": digests, "loss_start": start, "loss_end": end}


if __name__ == "__main__":
    main()
