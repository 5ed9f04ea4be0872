"""What a checkpoint costs in memory: DiLoCo's ``state_dict()`` and the state files of ``lowcomm
train`` and the elastic workers (``save_state`` / ``load_state``).

    python benchmarks/state_memory.py --json benchmarks/results/state_memory.json

Each part runs in a fresh process (the peak is the process's resident high-water mark,
``VmHWM``, reset before the part): a model of ``--layers`` Linear layers of ``--width`` squared
(fp32, on the CPU) under vanilla DiLoCo (one fragment, a group of one), then

- ``state_dict``: the memory ``DiLoCo.state_dict()`` adds and holds, and the bytes ``torch.save``
  writes of it (the fixed layout, and ``compact=True`` where this lowcomm has it). It copied the
  global parameters and the outer momentum and gave each empty in-flight slot zeros of its
  fragment's size, all on the outer device (on a GPU, the GPU's memory: not measured here);
- ``save`` / ``load``: the model's ``state_dict()`` written with ``save_state`` and read back with
  ``load_state`` (a ``--checkpoint-every`` checkpoint, a worker's checkpoint);
- ``transfer``: the model's ``state_dict()`` sent to a joiner (``send_state`` / ``recv_state``
  on loopback), the joiner a process of its own: the memory each side adds (the donor packed the
  whole state into one buffer before it sent it; the joiner builds the state it receives).

Run it with ``PYTHONPATH`` set to another checkout to measure that one's code.
"""

from __future__ import annotations

from common import PEAK_PRELUDE, peak_memory_probe, probe_args, write_probe

SETUP = """
import gc, inspect, json, os, sys, tempfile, time
import torch
import lowcomm

width, layers = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
diloco = lowcomm.DiLoCo(model, None, lowcomm.LocalGroup.create(1)[0], sync_every=10, fragments=1)
model_mb = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
folder = tempfile.mkdtemp()
gc.collect()
"""

STATE_DICT = """
def saved_mb(state):
    path = os.path.join(folder, "state.pt")
    torch.save(state, path)
    size = os.path.getsize(path) / 2**20
    os.remove(path)
    return size

reset_peak()
rss = rss_mb()
t = time.perf_counter()
state = diloco.state_dict()
row = {
    "model_mb": model_mb,
    "state_dict_peak_added_mb": hwm_mb() - rss,
    "state_dict_held_mb": rss_mb() - rss,
    "state_dict_seconds": time.perf_counter() - t,
    "saved_mb": saved_mb(state),
}
if "compact" in inspect.signature(diloco.state_dict).parameters:
    row["saved_compact_mb"] = saved_mb(diloco.state_dict(compact=True))
print(json.dumps(row))
"""

FILES = """
from lowcomm.runtime.statefile import load_state, save_state

state = model.state_dict()
path = os.path.join(folder, "state.lcs")
reset_peak()
rss = rss_mb()
t = time.perf_counter()
save_state(path, state)
row = {"save_peak_added_mb": hwm_mb() - rss, "save_seconds": time.perf_counter() - t}
del state
gc.collect()
reset_peak()
rss = rss_mb()
t = time.perf_counter()
back = load_state(path)
row.update(load_peak_added_mb=hwm_mb() - rss, load_seconds=time.perf_counter() - t)
row["file_mb"] = os.path.getsize(path) / 2**20
os.remove(path)
print(json.dumps(row))
"""

JOINER = """
import datetime, json, sys
import torch.distributed as dist
from lowcomm.runtime.elastic.transfer import recv_state

store = dist.TCPStore("127.0.0.1", int(sys.argv[1]), is_master=False)
group = dist.ProcessGroupGloo(dist.PrefixStore("t/", store), 1, 2, datetime.timedelta(seconds=300))
reset_peak()
rss = rss_mb()
store.set("ready", "1")
state = recv_state(group, 0, bytes(32))
print(json.dumps({"transfer_joiner_peak_added_mb": hwm_mb() - rss}))
"""

TRANSFER = """
import datetime, inspect, subprocess
import torch.distributed as dist
from lowcomm.runtime.elastic.transfer import pack, send_state

state, key = model.state_dict(), bytes(32)
master = dist.TCPStore("127.0.0.1", 0, is_master=True, wait_for_workers=False)
joiner = subprocess.Popen([sys.executable, "-c", JOINER, str(master.port)], stdout=subprocess.PIPE, text=True)
group = dist.ProcessGroupGloo(dist.PrefixStore("t/", master), 0, 2, datetime.timedelta(seconds=300))
master.wait(["ready"])
reset_peak()
rss = rss_mb()
t = time.perf_counter()
old = "flat" in inspect.signature(send_state).parameters  # (an older lowcomm's took pack's bytes)
send_state(group, *(pack(state) if old else (state,)), dst=1, key=key)
row = {"transfer_donor_peak_added_mb": hwm_mb() - rss, "transfer_seconds": time.perf_counter() - t}
out, _ = joiner.communicate(timeout=300)
row.update(json.loads(out.strip().splitlines()[-1]))
print(json.dumps(row))
"""


def main() -> None:
    args = probe_args(__doc__)
    row = {
        **peak_memory_probe(SETUP + STATE_DICT, args.width, args.layers),
        **peak_memory_probe(SETUP + FILES, args.width, args.layers),
        # (the joiner, a process of the probe's, measures itself the same way)
        **peak_memory_probe(
            SETUP + f"JOINER = {PEAK_PRELUDE + JOINER!r}\n" + TRANSFER, args.width, args.layers
        ),
    }
    model = row["model_mb"]
    print(
        f"a model of {model:.0f} MB: DiLoCo.state_dict() +{row['state_dict_peak_added_mb']:.0f} MB at its "
        f"peak, {row['state_dict_held_mb']:.0f} MB held, torch.save {row['saved_mb']:.0f} MB"
        + (f" ({row['saved_compact_mb']:.0f} MB compact)" if "saved_compact_mb" in row else "")
    )
    print(
        f"save_state +{row['save_peak_added_mb']:.0f} MB in {row['save_seconds']:.2f} s, load_state "
        f"+{row['load_peak_added_mb']:.0f} MB (the state itself: {model:.0f} MB) in "
        f"{row['load_seconds']:.2f} s"
    )
    print(
        f"a transfer of the model's state to a joiner (another process, on loopback) in "
        f"{row['transfer_seconds']:.2f} s: the donor +{row['transfer_donor_peak_added_mb']:.0f} MB, "
        f"the joiner +{row['transfer_joiner_peak_added_mb']:.0f} MB"
    )
    write_probe("state_memory", args, row)


if __name__ == "__main__":
    main()
