"""A plain Hugging Face Trainer script with DiLoCo added: the lines marked ``# DiLoCo`` are all that
changed (5, and a sixth that picks the checkpoint to resume from).

    lowcomm launch --replicas 2 -- python examples/hf_diloco.py --out runs/hf

Each process trains its own replica of a small GPT-2 on its own data; every 8 optimizer steps the
replicas average what they learned (DiLoCo's outer step). ``replica_group()`` joins the replicas'
group and hides the launcher's RANK / WORLD_SIZE, so the Trainer (and accelerate) see one process
and do not wrap the model in DDP. The Trainer's checkpoints carry DiLoCo's state (``diloco.pt``):
``--resume`` continues from the newest one every replica holds (and starts anew where none does,
so a job under ``torchrun --max-restarts`` can always pass it). Run without ``lowcomm launch``, one
replica trains.

A replica may be several processes, with the Trainer's DDP inside it (DiLoCo between replicas):

    lowcomm launch --replicas 2 --procs-per-replica 2 -- python examples/hf_diloco.py

``replica_group()`` then shows the Trainer its replica's 2 processes as the whole job.
"""

import argparse
import json
import os

import torch
from torch.utils.data import Dataset
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments, set_seed

from lowcomm.integrations.hf import DiLoCoTrainerCallback, replica_group, resume_checkpoint  # DiLoCo


class Counting(Dataset):
    """Sequences that count up modulo the vocabulary from a random start: learnable in a few steps."""

    def __init__(self, seed: int, n: int = 256, length: int = 16, vocab: int = 64) -> None:
        start = torch.randint(0, vocab, (n, 1), generator=torch.Generator().manual_seed(seed))
        self.ids = (start + torch.arange(length)) % vocab

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="runs/hf", help="where checkpoints and the result go")
    ap.add_argument("--steps", type=int, default=48, help="optimizer steps in all")
    ap.add_argument("--accumulate", type=int, default=1, help="batches per optimizer step")
    ap.add_argument("--save-every", type=int, default=16, help="optimizer steps between checkpoints")
    ap.add_argument("--resume", action="store_true", help="continue from a checkpoint in --out")
    args = ap.parse_args()

    group = replica_group()  # DiLoCo: this process's replica; the Trainer then sees one process
    out = os.path.join(args.out, f"replica{group.rank}")  # DiLoCo: a folder per replica
    set_seed(0)
    config = GPT2Config(
        vocab_size=64, n_positions=16, n_embd=32, n_layer=2, n_head=2, bos_token_id=0, eos_token_id=0
    )
    model = GPT2LMHeadModel(config)
    training = TrainingArguments(
        output_dir=out,
        max_steps=args.steps,
        per_device_train_batch_size=8,
        gradient_accumulation_steps=args.accumulate,
        learning_rate=3e-3,
        save_steps=args.save_every,
        logging_steps=8,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=training, train_dataset=Counting(seed=group.rank))  # DiLoCo: own data
    DiLoCoTrainerCallback(group, sync_every=8, fragments=2, overlap=1).add_to(trainer)  # DiLoCo
    trainer.train(resume_from_checkpoint=resume_checkpoint(group, out) if args.resume else None)  # DiLoCo

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    result = {
        "params": flat.tolist(),
        "global_step": trainer.state.global_step,
        "world_size": trainer.args.world_size,
        "wrapped": type(trainer.model_wrapped).__name__,
        "rounds_logged": sum(e.get("diloco/rounds", 0) for e in trainer.state.log_history),
    }
    name = "result.json" if trainer.is_world_process_zero() else f"result.rank{training.process_index}.json"
    with open(os.path.join(out, name), "w") as f:
        json.dump(result, f)


if __name__ == "__main__":
    main()
