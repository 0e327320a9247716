"""A module's Variables split once into flat lists of arrays, for `jax.jit` functions that take them apart.

`nnx.jit` splits its module arguments on every call (a graph traversal: about
0.1-0.2 s for flux-dev's 1,500 Variables) and returns every Variable it was
given, so XLA allocates a new output buffer for each, changed or not. The
steps in `flow` and `sampling` instead split a module once, keep its live
Variables in flat lists (`Split`), and hand a plain `jax.jit` function the
current arrays of each part: what the function does not return (the frozen
base) is a read-only input, what it changes is returned and donated.

`Layout` is the static half: the graphdef, the filters and each part's
paths. It is hashable and compares by value, so two models of the same
structure share one compilation, and inside the traced function
`layout.merge(*parts)` rebuilds the module from the arrays.

The split is taken the first time a module is seen (cached per object):
later changes of its values are seen, changes of its structure (Variables
added or replaced, e.g. LoRA applied afterwards) are not; call `forget` after
such a change.
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Sequence
from typing import Any

import jax
from flax import nnx


@dataclasses.dataclass(frozen=True, eq=False)
class Layout:
    """The static half of a split: graphdef, filters and each part's Variable paths."""

    graphdef: Any
    filters: tuple
    paths: tuple[tuple[tuple, ...], ...]  # per part, the Variables' paths (nnx.to_flat_state order)

    def __post_init__(self):
        try:
            h = hash((self.graphdef, self.filters, self.paths))
        except TypeError:  # a static attribute that is a list (e.g. conv padding): __eq__ still compares it
            h = hash((self.filters, self.paths))
        object.__setattr__(self, "_hash", h)

    def __hash__(self):
        return self._hash

    def __eq__(self, other: object) -> bool:
        return self is other or (isinstance(other, Layout) and self._hash == other._hash
                                 and self.paths == other.paths and self.filters == other.filters
                                 and self.graphdef == other.graphdef)

    def merge(self, *parts: Sequence[Any]) -> nnx.Pytree:
        """The module with each part's Variables set to the given arrays (one list per part)."""
        if len(parts) != len(self.paths):
            raise ValueError(f"{len(parts)} parts for a layout of {len(self.paths)}")
        states = [nnx.from_flat_state(list(zip(paths, values))) for paths, values in zip(self.paths, parts)]
        return nnx.merge(self.graphdef, *states)

    def values_of(self, node: nnx.Pytree) -> list[list[Any]]:
        """Each part's arrays of `node` (a module of this layout, e.g. after a traced update)."""
        _, *states = nnx.split(node, *self.filters)
        out = []
        for paths, state in zip(self.paths, states):
            flat = nnx.to_flat_state(state)
            got = tuple(p for p, _ in flat)
            if got != paths:
                raise ValueError(f"the module's structure changed inside the step: {len(got)} Variables where "
                                 f"{len(paths)} went in")
            out.append([v.get_value() for _, v in flat])
        return out


class Split:
    """A module's live Variables per part; `values(i)` reads part i's arrays, `assign(i, arrays)` writes them."""

    def __init__(self, node: nnx.Pytree, filters: tuple):
        graphdef, *states = nnx.split(node, *filters)
        flats = [nnx.to_flat_state(s) for s in states]
        self.layout = Layout(graphdef, tuple(filters), tuple(tuple(p for p, _ in f) for f in flats))
        self.variables = [[v for _, v in f] for f in flats]

    def values(self, i: int) -> list[Any]:
        return [v.get_value() for v in self.variables[i]]

    def assign(self, i: int, arrays: Sequence[Any]) -> None:
        for v, x in zip(self.variables[i], arrays, strict=True):
            v.set_value(x)

    def nbytes(self, i: int) -> int:
        """Bytes of part i's arrays (abstract values count too)."""
        return int(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(self.values(i))))


class Cache:
    """Splits per (live module object, filters); an entry goes when its module is garbage-collected."""

    def __init__(self):
        self._entries: dict[tuple[int, tuple], tuple[weakref.ref, Split]] = {}

    def get(self, node: nnx.Pytree, filters: tuple = ()) -> Split:
        key = (id(node), tuple(filters))
        hit = self._entries.get(key)
        if hit is not None and hit[0]() is node:
            return hit[1]
        split = Split(node, tuple(filters))
        ref = weakref.ref(node, lambda _, k=key, c=self._entries: c.pop(k, None))
        self._entries[key] = (ref, split)
        return split

    def forget(self, node: nnx.Pytree | None = None) -> None:
        """Drops the cached splits of `node` (all of them without one): its structure changed."""
        if node is None:
            self._entries.clear()
            return
        for key in [k for k in self._entries if k[0] == id(node)]:
            del self._entries[key]
