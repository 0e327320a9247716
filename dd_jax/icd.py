"""In-Context Decomposition (ICD): the image-token layout and LPEC position ids.

One token sequence holds every image layer: the clean condition `z` (the
composite) first, then the noisy targets (e.g. `x` the foreground and `y` the
background, or just `y` for removal tasks). Text tokens are prepended by the
transformer itself. Loss and sampling touch only the target tokens.

Layer Position Encoding Cloning (LPEC): `z` and the cloned targets (by
default `y`) get IDENTICAL RoPE ids (0, row, col), so every background token
sits at the same position as the composite pixel it came from; the other
targets (`x`) get ids disjoint from them, either through the first id axis
(offset="index": (k, row, col), as FLUX.1 Kontext places its reference image)
or through a column shift (offset="spatial": (0, row, col + k*w), as
OminiControl does). `lpec=False` (the paper's ablation) gives every layer its
own ids.

Latent packing (2x2 patches into tokens) follows BFL: NCHW
"b c (h 2) (w 2) -> b (h w) (c 2 2)", here on NHWC arrays.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import jax.numpy as jnp
import numpy as np

OFFSETS = ("index", "spatial")


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    """Which image layers form the sequence, and how their positions are encoded."""

    condition: str = "z"
    targets: tuple[str, ...] = ("x", "y")
    lpec: bool = True
    cloned: tuple[str, ...] = ("y",)
    offset: str = "index"
    condition_t0: bool = False  # modulate condition tokens as timestep 0 (OminiControl)

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        object.__setattr__(self, "cloned", tuple(self.cloned))
        if not self.targets:
            raise ValueError("an ICD layout needs at least one noisy target layer")
        names = (self.condition,) + self.targets
        if len(set(names)) != len(names):
            raise ValueError(f"layer names must be distinct: {names}")
        if not set(self.cloned) <= set(self.targets):
            raise ValueError(f"cloned layers {self.cloned} must be targets {self.targets}")
        if self.offset not in OFFSETS:
            raise ValueError(f"offset must be one of {OFFSETS}, got {self.offset!r}")

    @property
    def layers(self) -> tuple[str, ...]:
        return (self.condition,) + self.targets

    def slots(self) -> dict[str, int]:
        """Position slot of each layer: equal slots mean identical ids."""
        slots = {self.condition: 0}
        nxt = 1
        for name in self.targets:
            if self.lpec and name in self.cloned:
                slots[name] = 0
            else:
                slots[name] = nxt
                nxt += 1
        return slots


def grid_ids(h: int, w: int, slot: int = 0, offset: str = "index") -> np.ndarray:
    """Ids [h*w, 3] of a token grid: (slot, row, col) or (0, row, col + slot*w)."""
    ids = np.zeros((h, w, 3), np.float32)
    ids[..., 1] = np.arange(h)[:, None]
    ids[..., 2] = np.arange(w)[None, :]
    if offset == "index":
        ids[..., 0] = slot
    else:
        ids[..., 2] += slot * w
    return ids.reshape(h * w, 3)


def layer_ids(spec: LayerSpec, h: int, w: int) -> dict[str, np.ndarray]:
    return {name: grid_ids(h, w, slot, spec.offset) for name, slot in spec.slots().items()}


def position_ids(spec: LayerSpec, h: int, w: int) -> np.ndarray:
    """Ids [len(layers) * h*w, 3] for the image part of the sequence, in layer order."""
    ids = layer_ids(spec, h, w)
    return np.concatenate([ids[name] for name in spec.layers], axis=0)


def masks(spec: LayerSpec, n: int) -> tuple[np.ndarray, np.ndarray]:
    """(noisy_mask, cond_mask), each [len(layers) * n] bool."""
    cond = np.zeros(len(spec.layers) * n, bool)
    cond[:n] = True
    return ~cond, cond


def build_sequence(spec: LayerSpec, tokens: Mapping[str, jnp.ndarray], h: int,
                   w: int) -> tuple[jnp.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Concatenates layer tokens [B, h*w, C] into the image sequence.

    Returns (img [B, L, C], img_ids [L, 3], noisy_mask [L], cond_mask [L]).
    """
    missing = [n for n in spec.layers if n not in tokens]
    if missing:
        raise KeyError(f"layer(s) {missing} missing; the layout needs {spec.layers}")
    for name in spec.layers:
        if tokens[name].shape[1] != h * w:
            raise ValueError(f"layer {name!r} has {tokens[name].shape[1]} tokens, expected {h}x{w}={h * w}")
    img = jnp.concatenate([tokens[name] for name in spec.layers], axis=1)
    noisy, cond = masks(spec, h * w)
    return img, position_ids(spec, h, w), noisy, cond


def split_layers(spec: LayerSpec, seq: jnp.ndarray, n: int, include_condition: bool = False) -> dict[str, jnp.ndarray]:
    """Splits model output [B, L, C] back into layers {name: [B, n, C]} (targets only by default)."""
    if seq.shape[1] != len(spec.layers) * n:
        raise ValueError(f"sequence of {seq.shape[1]} tokens does not hold {len(spec.layers)} layers of {n}")
    out = {name: seq[:, i * n:(i + 1) * n] for i, name in enumerate(spec.layers)}
    if not include_condition:
        out.pop(spec.condition)
    return out


def pack(latents: jnp.ndarray) -> jnp.ndarray:
    """NHWC latents [B, H, W, C] -> tokens [B, (H/2)(W/2), 4C] in BFL's (c, ph, pw) order."""
    b, hh, ww, c = latents.shape
    if hh % 2 or ww % 2:
        raise ValueError(f"latent height and width must be even to pack 2x2, got {hh}x{ww}")
    x = latents.reshape(b, hh // 2, 2, ww // 2, 2, c).transpose(0, 1, 3, 5, 2, 4)
    return x.reshape(b, (hh // 2) * (ww // 2), c * 4)


def unpack(tokens: jnp.ndarray, height: int, width: int) -> jnp.ndarray:
    """Inverse of `pack`: tokens [B, (H/2)(W/2), 4C] -> NHWC [B, H, W, C] (H, W in latent pixels)."""
    b, n, c4 = tokens.shape
    h, w = height // 2, width // 2
    if n != h * w:
        raise ValueError(f"{n} tokens cannot be unpacked to a {height}x{width} latent")
    x = tokens.reshape(b, h, w, c4 // 4, 2, 2).transpose(0, 1, 4, 2, 5, 3)
    return x.reshape(b, height, width, c4 // 4)
