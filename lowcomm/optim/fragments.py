"""Which parameters each fragment holds (Streaming DiLoCo syncs one fragment at a time).

With a count ``P``, the model's repeated blocks are split over the fragments: every list of
repeated blocks counts (GPT-2's ``transformer.h``, T5's ``encoder.block`` and ``decoder.block``),
in model order; the parameters outside them (embeddings, head, final norms) form the last fragment,
or, where that makes the largest fragment smaller (a small vocabulary's embeddings), join the
smallest fragment while the blocks are split over all ``P``.
Explicit fragments name parameters, modules, or modules by name (``"transformer.h.0"``). A weight
tied between modules (an embedding shared with the head, say) belongs to the first fragment that
names a module holding it. A model's floating-point buffers saved with it (BatchNorm's running
statistics) travel with the fragment holding their module's parameters (the nearest enclosing
module's, for a module without any; the last fragment's, for the model's own). Fragments more
than 2x apart in size are named in a warning: a round of a big fragment takes longer, so its
pseudo-gradient waits longer for the network.

References:
    Douillard et al., "Streaming DiLoCo with overlapping communication" (2025), section 2.2.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from torch import nn

from .schedule import PATTERNS, partition_blocks

__all__ = ["find_blocks", "find_block_lists", "build_fragments", "synced_buffers", "assign_buffers"]

log = logging.getLogger(__name__)


def find_block_lists(model: nn.Module) -> list[tuple[str, nn.ModuleList]]:
    """The model's lists of repeated blocks, in model order: every ``nn.ModuleList`` of two or more
    modules of one type holding parameters, that is not inside another such list."""
    out: list[tuple[str, nn.ModuleList]] = []
    for name, mod in model.named_modules():
        if not isinstance(mod, nn.ModuleList) or len(mod) < 2 or len({type(m) for m in mod}) != 1:
            continue
        if any(name.startswith(f"{prev}.") for prev, _ in out) or not any(True for _ in mod.parameters()):
            continue
        out.append((name, mod))
    return out


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """The model's largest list of repeated blocks (by parameters), or None."""
    lists = find_block_lists(model)
    return max(lists, key=lambda nm: sum(p.numel() for p in nm[1].parameters()), default=None)


def build_fragments(
    model: nn.Module, fragments: int | Sequence[Sequence[str | nn.Module]], pattern: str = "strided"
) -> list[list[str]]:
    """Parameter names of each fragment, every trainable parameter in exactly one.

    Args:
        model: the replica's model.
        fragments: a count ``P``, or explicit fragments: lists of parameter names, module names
            and/or modules. With a count, ``P = 1`` is the whole model; for ``P > 1`` the
            parameters outside the blocks form the last fragment of their own and the blocks (of
            every block list, in model order) are split over the other ``P − 1`` by ``pattern`` (a
            model with no parameters outside its blocks splits them over all ``P``), unless
            splitting the blocks over all ``P`` and adding those parameters to the smallest
            fragment (the last of equals) makes the largest fragment smaller: then that.
        pattern: "strided" (block ℓ to fragment ℓ mod P) or "sequential".

    Raises:
        ValueError: a count out of range, no blocks to split, a name that is neither a parameter
            nor a module, a parameter named in two fragments, a parameter in none.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    if not named:
        raise ValueError("the model has no trainable parameters")
    if pattern not in PATTERNS:
        raise ValueError(f"unknown fragment pattern {pattern!r}; allowed: {list(PATTERNS)}")
    if isinstance(fragments, int) and not isinstance(fragments, bool):
        out = _by_count(model, named, fragments, pattern)
    else:
        out = _explicit(model, named, fragments)
    _warn_if_uneven(out, dict(named))
    return out


def _by_count(model: nn.Module, named, fragments: int, pattern: str) -> list[list[str]]:
    all_names = [n for n, _ in named]
    if fragments < 1:
        raise ValueError(f"fragments must be >= 1, got {fragments}")
    if fragments == 1:
        return [all_names]
    lists = find_block_lists(model)
    if not lists:
        raise ValueError(
            f"fragments={fragments} needs repeated blocks (an nn.ModuleList) to split; this model has "
            "none: pass fragments=1 or explicit fragments as lists of parameter or module names"
        )
    prefixes = [f"{name}.{i}." for name, blocks in lists for i in range(len(blocks))]
    block_names = [[n for n, _ in named if n.startswith(pre)] for pre in prefixes]
    block_names = [names for names in block_names if names]  # blocks whose weights are all tied elsewhere
    in_blocks = {n for names in block_names for n in names}
    rest = [n for n in all_names if n not in in_blocks]
    groups = fragments - 1 if rest else fragments
    if groups > len(block_names):
        allowed = len(block_names) + (1 if rest else 0)
        raise ValueError(
            f"fragments={fragments} exceeds what the model allows: {len(block_names)} blocks"
            + (" plus one fragment for the parameters outside them" if rest else "")
            + f", so fragments must be in [1, {allowed}]"
        )

    def split(count: int) -> list[list[str]]:
        return [
            [n for b in grp for n in block_names[b]]
            for grp in partition_blocks(len(block_names), count, pattern)
        ]

    apart = split(groups) + ([rest] if rest else [])
    if not rest or len(block_names) < fragments:
        return apart
    # the rest may be small (a byte-level vocabulary's embeddings): then the blocks go over all P
    # and the rest joins the smallest fragment (the last of equals), where that makes the largest
    # fragment smaller: its round is the one that must hide behind the steps
    params = dict(named)
    joined = split(fragments)
    sizes = _sizes(joined, params)
    smallest = max(i for i, v in enumerate(sizes) if v == min(sizes))
    joined[smallest] = joined[smallest] + rest
    return joined if max(_sizes(joined, params)) < max(_sizes(apart, params)) else apart


def _explicit(model: nn.Module, named, fragments) -> list[list[str]]:
    all_names = [n for n, _ in named]
    canonical = {id(p): n for n, p in named}  # a tied weight's first name
    modules = dict(model.named_modules())
    module_names = {id(m): n for n, m in reversed(list(modules.items()))}  # a module's first name
    out: list[list[str]] = []
    seen: dict[str, tuple[int, str]] = {}  # parameter -> (fragment, the path it was placed by)
    for i, frag in enumerate(fragments):
        names: list[str] = []
        for item in frag:
            if isinstance(item, str) and item in canonical.values():
                _place(item, item, i, names, seen)
                continue
            if isinstance(item, str):
                if item not in modules:
                    raise ValueError(
                        f"fragment {i}: {item!r} is neither a trainable parameter nor a module of the model"
                    )
                item = modules[item]
            if not isinstance(item, nn.Module):
                raise ValueError(
                    f"fragment {i}: entries must be parameter or module names or modules, "
                    f"got {type(item).__name__}"
                )
            prefix = module_names.get(id(item), "")
            for local, p in item.named_parameters(remove_duplicate=False):
                if id(p) in canonical:
                    _place(canonical[id(p)], f"{prefix}.{local}" if prefix else local, i, names, seen)
        if not names:
            raise ValueError(f"fragment {i} holds no parameters (its weights are all in earlier fragments)")
        out.append(names)
    missing = [n for n in all_names if n not in seen]
    if missing:
        raise ValueError(f"parameters in no fragment: {missing[:8]}{' ...' if len(missing) > 8 else ''}")
    return out


def _place(name: str, reached_as: str, i: int, names: list[str], seen: dict[str, tuple[int, str]]) -> None:
    """Put parameter ``name``, reached under the path ``reached_as``, in fragment ``i``'s ``names``.

    Reached again under the path it was placed by, it is named twice (a module and one of its
    submodules, say): an error. Reached under another path, it is a tied weight: it stays where
    it was placed first."""
    if name in seen:
        where, path = seen[name]
        if path == reached_as and where != i:
            raise ValueError(f"parameter {name!r} is in fragment {where} and fragment {i}")
        return
    seen[name] = (i, reached_as)
    names.append(name)


def synced_buffers(model: nn.Module) -> list[str]:
    """The buffers DiLoCo can synchronize: floating-point ones saved with the model (BatchNorm's
    running statistics; not a non-persistent cache, not an integer counter)."""
    saved = model.state_dict(keep_vars=True)
    return [n for n, b in model.named_buffers() if n in saved and b.is_floating_point()]


def assign_buffers(model: nn.Module, fragments: list[list[str]]) -> list[list[str]]:
    """The :func:`synced_buffers` of each fragment: a buffer goes with the first fragment holding a
    parameter of its module, else of the nearest module around it that has one; else (a buffer of
    the model itself) the last."""
    out: list[list[str]] = [[] for _ in fragments]
    owner = {n: i for i, names in enumerate(fragments) for n in names}
    for name in synced_buffers(model):
        prefix, frag = name.rpartition(".")[0], len(fragments) - 1
        while prefix:
            hits = [i for n, i in owner.items() if n.startswith(f"{prefix}.")]
            if hits:
                frag = min(hits)
                break
            prefix = prefix.rpartition(".")[0]
        out[frag].append(name)
    return out


#: layouts already warned about (replicas of one process share theirs: one warning)
_WARNED: set[tuple[int, ...]] = set()


def _sizes(fragments: list[list[str]], params: dict) -> list[int]:
    """Each fragment's parameter count (``params``: name -> parameter)."""
    return [sum(params[n].numel() for n in names) for names in fragments]


def _warn_if_uneven(fragments: list[list[str]], params: dict) -> None:
    sizes = _sizes(fragments, params)
    if len(sizes) > 1 and max(sizes) > 2 * min(sizes) and tuple(sizes) not in _WARNED:
        _WARNED.add(tuple(sizes))
        big, small = sizes.index(max(sizes)), sizes.index(min(sizes))
        log.warning(
            "fragments differ in size by more than 2x: fragment %d holds %d parameters, fragment %d holds %d "
            "(sizes %s); a big fragment's round takes longer",
            big,
            sizes[big],
            small,
            sizes[small],
            sizes,
        )
