"""How far each low-precision recipe's three GEMMs land from exact ones on a model's own tensors.
Prints JSON.

    python benchmarks/fp8_gradients.py --json benchmarks/results/fp8_gradients.json
    python benchmarks/fp8_gradients.py --model-dim 1024 --layers 4 --seq-len 1024 --batch-size 2

The reference GPT trains ``--steps`` steps in bf16 autocast (AdamW, gradient norm clipped to 1),
then one more forward and backward records, for every Linear layer but the head, its input x,
its weight W and the gradient dy of its output. Each recipe's fprop (x·Wᵀ), dgrad (dy·W) and
wgrad (dyᵀ·x) are computed from them through ``qmatmul``'s emulated backend (the recipe's bytes
and scales; fp32 sums, so a GPU's fp8 MMA adds its accumulation error on top: docs/references.md)
with the gradient in e4m3 and in e5m2, and compared with the fp64 products: the relative
Frobenius error, the mean of each output row's own relative error (``_row_mean``) and the share
of rows off by more than half their norm (``_rows_lost``), mean and largest over the layers.
``dy_underflow`` is the share of dy's nonzero values that quantize to zero (a tensorwise or
rowwise scale set by the largest value leaves the smallest below the format's least subnormal).

What it answers: whether a recipe's per-step GEMM error explains a gap between its training loss
and bf16's (the H200 measured fp8 tensorwise 1.025x and delayed 1.040x bf16's loss at d=1024 after
100 steps; rowwise 1.004x). It measures one step's error, not its effect over a run. fp8_delayed
is tensorwise with scales from earlier steps' maxima, which this does not replay.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import stamp, write_result  # noqa: E402

from lowcomm.kernels import qmatmul, quantize_fp8  # noqa: E402
from lowcomm.lm import GPT, GPTConfig, load_corpus  # noqa: E402
from lowcomm.lm.data import BatchSampler  # noqa: E402

RECIPES = ("fp8_tensorwise", "fp8_rowwise", "mxfp8", "mxfp8_fast")
GRAD_ELEMS = ("e4m3", "e5m2")


def capture(cfg: GPTConfig, batch_size: int, steps: int, lr: float, device: str) -> tuple[dict, float]:
    """``({layer: (x, W, dy)}, loss)`` after ``steps`` bf16 steps: each Linear's (but the head's)
    input, weight and output gradient in fp32, from one more forward and backward."""
    torch.manual_seed(0)
    corpus = load_corpus()
    model = GPT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    sampler = BatchSampler(corpus.train, batch_size, cfg.seq_len, seed=0)

    def loss_of_a_batch() -> torch.Tensor:
        x, y = (t.to(device) for t in sampler.next())
        with torch.autocast(torch.device(device).type, torch.bfloat16):
            return model(x, y)

    for _ in range(steps):
        loss_of_a_batch().backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    caught, hooks = {}, []
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) and name.split(".")[-1] != "head":

            def keep(mod, inputs, out, name=name):
                x = inputs[0].detach().reshape(-1, inputs[0].shape[-1]).float()
                w = mod.weight.detach().float()

                def grad(g):
                    caught[name] = (x, w, g.reshape(-1, g.shape[-1]).float())

                out.register_hook(grad)

            hooks.append(module.register_forward_hook(keep))
    loss = loss_of_a_batch()
    loss.backward()
    for h in hooks:
        h.remove()
    return caught, float(loss.detach())


def _rel(got: torch.Tensor, ref: torch.Tensor) -> tuple[float, float, float]:
    """The relative Frobenius error of ``got``; the mean of its rows' own relative errors; the
    share of its rows (of those not zero in ``ref``) that are off by more than half their norm."""
    diff = got.double() - ref
    rows = diff.norm(dim=1) / ref.norm(dim=1)
    rows = rows[ref.norm(dim=1) > 0]
    return float(diff.norm() / ref.norm()), float(rows.mean()), float((rows > 0.5).double().mean())


def errors(caught: dict) -> dict:
    """Per recipe and gradient format: each GEMM's relative error, its rows' mean relative error
    and the share of rows lost (mean and max over the layers); dy's underflow under tensorwise and
    rowwise scaling. A row is a token of fprop and dgrad, an out-feature of wgrad: AdamW scales
    each weight's step by its own gradient's size, so a small row computed wrong matters as much
    as a large one, where the Frobenius error hardly sees it."""
    per: dict = {f"{r}/{g}": {} for r in RECIPES for g in GRAD_ELEMS}

    def add(row: dict, gemm: str, errs: tuple[float, float, float]) -> None:
        for key, value in zip(("", "_row_mean", "_rows_lost"), errs):
            row.setdefault(gemm + key, []).append(value)

    under: dict = {f"{s}/{g}": [] for s in ("tensorwise", "rowwise") for g in GRAD_ELEMS}
    for x, w, dy in caught.values():
        refs = {
            "fprop": x.double() @ w.double().t(),
            "dgrad": dy.double() @ w.double(),
            "wgrad": dy.double().t() @ x.double(),
        }
        nonzero = dy != 0
        for r in RECIPES:
            fprop = qmatmul(x, w.t(), r, backend="emulated")
            for g in GRAD_ELEMS:
                row = per[f"{r}/{g}"]
                add(row, "fprop", _rel(fprop, refs["fprop"]))  # (no gradient in it)
                add(row, "dgrad", _rel(qmatmul(dy, w, r, elem_a=g, backend="emulated"), refs["dgrad"]))
                wgrad = qmatmul(dy.t().contiguous(), x, r, elem_a=g, backend="emulated")
                add(row, "wgrad", _rel(wgrad, refs["wgrad"]))
        for s in ("tensorwise", "rowwise"):
            for g in GRAD_ELEMS:
                q, _ = quantize_fp8(dy, g, s, axis=-1)
                lost = ((q.float() == 0) & nonzero).sum() / nonzero.sum().clamp(min=1)
                under[f"{s}/{g}"].append(float(lost))

    def summary(values: list[float]) -> dict:
        return {"mean": sum(values) / len(values), "max": max(values)}

    return {
        "rel_err_vs_fp64": {k: {name: summary(v) for name, v in row.items()} for k, row in per.items()},
        "dy_underflow": {k: summary(v) for k, v in under.items()},
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model-dim", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--steps", type=int, default=60, help="bf16 training steps before the capture")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default="")
    a = p.parse_args()
    cfg = GPTConfig(vocab_size=256, seq_len=a.seq_len, n_layer=a.layers, n_head=a.heads, n_embd=a.model_dim)
    caught, loss = capture(cfg, a.batch_size, a.steps, a.lr, a.device)
    out = {
        **stamp("fp8_gradients"),
        "model_dim": a.model_dim,
        "layers": a.layers,
        "seq_len": a.seq_len,
        "batch_size": a.batch_size,
        "steps": a.steps,
        "loss_at_capture": loss,
        **errors(caught),
    }
    write_result(out, a.json)


if __name__ == "__main__":
    main()
