"""A plain Lightning script with DiLoCo added: the lines marked ``# DiLoCo`` are all that changed (5,
and a sixth that picks the checkpoint to resume from).

    lowcomm launch --replicas 2 -- python examples/lightning_diloco.py --out runs/lightning

Each process trains its own replica on its own data with its own AdamW; every 8 optimizer steps
the replicas average what they learned (DiLoCo's outer step) instead of all-reducing gradients
every step. ``replica_group()`` joins the replicas and hides the launcher's RANK / WORLD_SIZE, so
Lightning sees one process. Lightning's checkpoints carry DiLoCo's state: ``--resume`` continues a
run from the newest checkpoint every replica holds (and starts anew where none does, so a job
under ``torchrun --max-restarts`` can always pass it). Run without ``lowcomm launch``, one replica
trains (a group of one).

A replica may be several processes, with Lightning's DDP inside it (DiLoCo between replicas):

    lowcomm launch --replicas 2 --procs-per-replica 2 -- python examples/lightning_diloco.py --devices 2

``replica_group()`` then shows Lightning its replica's 2 processes as the whole job.
"""

import argparse
import json
import os

import lightning.pytorch as pl
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lowcomm.integrations.lightning import DiLoCoCallback, replica_group, resume_checkpoint  # DiLoCo


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(8, 32)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(32, 32), nn.Tanh()) for _ in range(2))
        self.out = nn.Linear(32, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = nn.functional.mse_loss(self(x), y)
        self.log("loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-3)


def data(seed: int, n: int = 512) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=g)
    y = torch.sin(x @ torch.linspace(-1, 1, 8)).unsqueeze(1)
    return DataLoader(TensorDataset(x, y), batch_size=32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/lightning", help="where checkpoints and results go")
    ap.add_argument("--epochs", type=int, default=3, help="epochs to train (in all, when resuming)")
    ap.add_argument("--devices", type=int, default=1, help="processes (GPUs) per replica: Lightning's DDP")
    ap.add_argument("--accumulate", type=int, default=1, help="batches per optimizer step")
    ap.add_argument("--resume", action="store_true", help="continue from a checkpoint")
    args = ap.parse_args()

    group = replica_group()  # DiLoCo: this process's replica; Lightning then sees one process
    out = os.path.join(args.out, f"replica{group.rank}")  # DiLoCo: a folder per replica
    pl.seed_everything(0)
    trainer = pl.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=args.devices,
        accumulate_grad_batches=args.accumulate,
        default_root_dir=out,
        enable_progress_bar=False,
        logger=False,
        callbacks=[
            pl.callbacks.ModelCheckpoint(save_top_k=-1, save_last=True),
            DiLoCoCallback(group, sync_every=8, fragments=2, overlap=1),  # DiLoCo
        ],
    )
    model = Regressor()
    ckpt = resume_checkpoint(group, out) if args.resume else None  # DiLoCo: the newest all replicas hold
    trainer.fit(model, data(seed=group.rank), ckpt_path=ckpt)  # DiLoCo: own data

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    result = {"params": flat.tolist(), "global_step": trainer.global_step, "world_size": trainer.world_size}
    name = "result.json" if trainer.is_global_zero else f"result.rank{trainer.global_rank}.json"
    with open(os.path.join(out, name), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
