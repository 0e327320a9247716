"""Procedural object-level foregrounds: glassware, X-ray contraband, cells --
and the two structured backgrounds that go with them (an X-ray baggage scan,
a fluorescence microscopy field).

Generators are ``fn(rng, h, w) -> (rgba float32 [h, w, 4], description)``;
backgrounds ``fn(rng, h, w) -> (rgb float32 [h, w, 3], description)``. Sizes
are given for a 512 px image and scale with ``min(h, w) / 512``.
"""

from __future__ import annotations

import numpy as np

from dd_jax.data import blend, raster

# ------------------------------------------------------------------ glassware
# (profile as (t, r) from the top t=0 to the foot t=1, r relative to the
#  widest point; height / width ratio; open at the top)
_GLASSES = {
    "wine glass": ([(0, .82), (.12, .95), (.3, 1), (.45, .78), (.53, .25), (.56, .05), (.9, .05),
                    (.95, .35), (1, .8)], 1.7, True),
    "tumbler": ([(0, 1), (1, .8)], 1.2, True),
    "bottle": ([(0, .2), (.03, .24), (.06, .2), (.25, .2), (.36, .55), (.45, .93), (.5, 1), (.97, 1),
                (1, .95)], 3.0, False),
    "vase": ([(0, .55), (.08, .42), (.3, .55), (.6, 1), (.85, .86), (1, .6)], 1.9, True),
    "jar": ([(0, .78), (.06, .78), (.09, .9), (.16, 1), (.93, 1), (1, .94)], 1.1, False),
    "flask": ([(0, .2), (.04, .24), (.3, .2), (.92, 1), (1, .96)], 1.4, True),
}
_TINTS = {"clear": (.9, .95, .96), "green": (.7, .9, .75), "blue": (.72, .84, .95),
          "amber": (.95, .72, .4)}
_LIQUIDS = {"red wine": (.45, .04, .12), "water": (.75, .88, .95), "juice": (1.0, .65, .15),
            "whisky": (.8, .45, .12)}


def _glass(rng, h, w, kind, cx, bottom, height):
    prof, ratio, open_top = _GLASSES[kind]
    rmax = height / ratio / 2
    top = bottom - height
    n = 96
    t = np.linspace(0, 1, n)
    radius = np.interp(t, [p[0] for p in prof], [p[1] for p in prof]) * rmax
    mask = raster.Canvas(h, w).polygon(raster.profile_polygon(cx, top, height, radius)).mask()
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r_at = np.interp(yy[:, 0], top + t * height, radius, left=0, right=0)[:, None]
    s = min(h, w) / 512.0
    edge = np.clip(2.0 * mask * (1.0 - raster.blur(mask, max(1.5, 0.05 * rmax))), 0, 1)
    tname = rng.choice(list(_TINTS)) if kind in ("bottle", "jar", "vase") else "clear"
    tint = np.asarray(_TINTS[tname], np.float32)
    layers = [raster.layer(mask * rng.uniform(0.03, 0.1), tint)]
    desc = f"a transparent {'' if tname == 'clear' else tname + ' '}glass {kind}"
    if rng.random() < 0.35 and kind != "flask" or kind == "flask" and rng.random() < 0.6:
        lname = rng.choice(list(_LIQUIDS))
        level = top + height * rng.uniform(0.3, 0.6 if kind != "wine glass" else 0.35)
        inner = np.clip(mask - edge, 0, 1) * (yy > level)
        if kind == "wine glass":
            inner = inner * (yy < top + 0.5 * height)
        layers.append(raster.layer(inner * rng.uniform(0.25, 0.5), _LIQUIDS[lname]))
        rl = np.interp(level, top + t * height, radius)
        men = raster.Canvas(h, w).ellipse(cx, level, rl * 0.97, rl * 0.12, width=1.5 * s).mask()
        layers.append(raster.layer(men * 0.6, (1, 1, 1)))
        desc += f" with {lname}"
    layers.append(raster.layer(edge * rng.uniform(0.45, 0.75), tint * 0.25))
    if open_top:  # the rim of the opening, seen slightly from above
        rim = raster.Canvas(h, w).ellipse(cx, top + 1, radius[0], radius[0] * 0.14, width=max(1.5, 2.5 * s))
        layers.append(raster.layer(rim.mask() * 0.7, tint * 0.35))
    # specular highlights: bright stripes that follow the profile
    hl = np.zeros((h, w), np.float32)
    fade = np.clip(np.minimum(yy - top, bottom - yy) / (0.15 * height), 0, 1)
    for pos in rng.uniform(-0.75, 0.75, size=int(rng.integers(1, 4))):
        wid = rng.uniform(0.04, 0.12)
        hl += rng.uniform(0.5, 1.0) * np.exp(-((xx - cx - pos * r_at) / (wid * r_at + 1.0)) ** 2)
    hl = np.clip(hl * mask * fade, 0, 1)
    layers.append(raster.layer(hl * rng.uniform(0.6, 0.95), (1, 1, 1)))
    return raster.stack(layers), desc


def glassware(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, str]:
    """One to three glass vessels standing on a common line, side by side."""
    k = int(rng.choice([1, 2, 3], p=[0.5, 0.35, 0.15]))
    bottom = h * rng.uniform(0.82, 0.97)
    seg = w / k
    parts, descs = [], []
    for i in range(k):
        kind = str(rng.choice(list(_GLASSES)))
        height = min(h * rng.uniform(0.45, 0.8), bottom - 0.03 * h, 0.85 * seg * _GLASSES[kind][1])
        width = height / _GLASSES[kind][1]
        cx = seg * i + seg / 2 + rng.uniform(-0.5, 0.5) * max(0.0, seg - width) * 0.8
        rgba, d = _glass(rng, h, w, kind, cx, bottom - i * 0.01 * h, height)
        parts.append(rgba)
        descs.append(d)
    return raster.stack(parts), " and ".join(descs)


# ------------------------------------------------------------------ X-ray
# SIXray-style pseudo colours: (colour A, alpha range)
_MATERIAL = {
    "metal": ((.24, .4, .85), (.75, .93)),
    "dense": ((.07, .1, .32), (.9, .98)),
    "organic": ((1.0, .62, .25), (.4, .65)),
    "mixed": ((.45, .82, .4), (.35, .6)),
}

# parts in an item frame: x along the item (0..1), y across; ("poly", pts) or
# ("ring", cx, cy, rx, ry, width) or ("disc", cx, cy, r)
_ITEMS = {
    "handgun": [("metal", "poly", [(0, -.05), (.95, -.05), (.95, .12), (0, .12)]),
                ("dense", "poly", [(.55, -.02), (.98, -.02), (.98, .05), (.55, .05)]),
                ("metal", "poly", [(.05, .12), (.33, .12), (.27, .62), (.02, .6)]),
                ("dense", "poly", [(.09, .2), (.26, .2), (.22, .55), (.07, .53)]),
                ("metal", "ring", .4, .19, .08, .07, .02), ("dense", "disc", .36, .18, .02)],
    "knife": [("metal", "poly", [(.38, -.06), (1.0, .02), (.95, .07), (.38, .08)]),
              ("organic", "poly", [(0, -.07), (.38, -.07), (.38, .09), (0, .09)]),
              ("dense", "disc", .1, .01, .02), ("dense", "disc", .26, .01, .02),
              ("metal", "poly", [(.35, -.1), (.4, -.1), (.4, .12), (.35, .12)])],
    "scissors": [("metal", "poly", [(.42, -.035), (1.0, .01), (.42, .025)]),
                 ("metal", "poly", [(.42, .035), (1.0, -.01), (.42, -.025)]),
                 ("metal", "poly", [(.44, -.03), (.44, .01), (.25, -.1), (.27, -.14)]),
                 ("metal", "poly", [(.44, .03), (.44, -.01), (.25, .1), (.27, .14)]),
                 ("mixed", "ring", .15, -.15, .12, .08, .045), ("mixed", "ring", .15, .15, .12, .08, .045),
                 ("dense", "disc", .43, 0, .022)],
    "wrench": [("metal", "poly", [(.12, -.05), (.88, -.05), (.88, .05), (.12, .05)]),
               ("metal", "ring", .08, 0, .09, .09, .05), ("metal", "ring", .92, 0, .08, .08, .05)],
    "cartridges": [("dense", "poly", [(0, y - .04), (.8, y - .04), (1.0, y), (.8, y + .04), (0, y + .04)])
                   for y in (-.2, -.1, 0, .1, .2)],
    "lighter": [("mixed", "poly", [(0, -.18), (1, -.18), (1, .18), (0, .18)]),
                ("metal", "poly", [(.75, -.18), (1, -.18), (1, .18), (.75, .18)]),
                ("dense", "disc", .87, 0, .08)],
}


_ITEM_WEIGHT = {"handgun": .27, "knife": .25, "scissors": .15, "wrench": .1, "cartridges": .1, "lighter": .13}


def _transform(pts, ox, oy, length, angle):
    c, s = np.cos(angle), np.sin(angle)
    return [(ox + length * (c * x - s * y), oy + length * (s * x + c * y)) for x, y in pts]


def _keep_inside(parts, ox, oy, length, angle, h, w):
    """Shifts an item's origin so that its bounding box lies in the image."""
    pts = []
    for part in parts:
        if part[1] == "poly":
            pts += part[2]
        else:
            cx, cy, r = part[2], part[3], part[4]
            pts += [(cx - r, cy - r), (cx + r, cy + r), (cx - r, cy + r), (cx + r, cy - r)]
    xy = np.array(_transform(pts, ox, oy, length, angle))
    m = 2.0
    dx = max(0.0, m - xy[:, 0].min()) - max(0.0, xy[:, 0].max() - (w - m))
    dy = max(0.0, m - xy[:, 1].min()) - max(0.0, xy[:, 1].max() - (h - m))
    return ox + dx, oy + dy


def _draw_part(h, w, part, ox, oy, length, angle) -> np.ndarray:
    canvas = raster.Canvas(h, w)
    if part[1] == "poly":
        canvas.polygon(_transform(part[2], ox, oy, length, angle))
    elif part[1] == "disc":
        t = np.linspace(0, 2 * np.pi, 20, endpoint=False)
        _, _, cx, cy, r = part
        canvas.polygon(_transform(list(zip(cx + r * np.cos(t), cy + r * np.sin(t))), ox, oy, length, angle))
    else:
        _, _, cx, cy, rx, ry, wid = part
        t = np.linspace(0, 2 * np.pi, 33)
        pts = _transform(list(zip(cx + rx * np.cos(t), cy + ry * np.sin(t))), ox, oy, length, angle)
        canvas.line(pts, width=wid * length)
    return canvas.mask()


def _absorb(t, rng, mask, material, thick_sigma) -> None:
    """Multiplies ``t`` in place by the transmittance (1 - alpha) + alpha A of
    one part (thicker, so denser, inside); works on the part's bounding box."""
    colour, (lo, hi) = _MATERIAL[material]
    level = rng.uniform(lo, hi)
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return
    pad = int(3 * thick_sigma) + 2
    y0, y1 = max(0, rows[0] - pad), min(mask.shape[0], rows[-1] + pad + 1)
    x0, x1 = max(0, cols[0] - pad), min(mask.shape[1], cols[-1] + pad + 1)
    m = mask[y0:y1, x0:x1]
    thick = raster.blur(m, thick_sigma)
    alpha = m * level * (0.6 + 0.4 * np.clip(thick * 1.6, 0, 1))
    t[y0:y1, x0:x1] *= 1.0 - alpha[..., None] * (1.0 - np.asarray(colour, np.float32))


def xray(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, str]:
    """One or two contraband items in SIXray pseudo-colour, with internal density."""
    s = min(h, w)
    t = np.ones((h, w, 3), np.float32)
    picks = rng.choice(list(_ITEMS), size=int(rng.choice([1, 2], p=[0.7, 0.3])), replace=False,
                       p=[_ITEM_WEIGHT[k] for k in _ITEMS])
    names = []
    for name in map(str, picks):
        length = s * rng.uniform(0.3, 0.6) * (0.5 if name in ("cartridges", "lighter") else 1.0)
        angle = rng.uniform(0, 2 * np.pi)
        ox = rng.uniform(0.15, 0.85) * w - 0.5 * length * np.cos(angle)
        oy = rng.uniform(0.15, 0.85) * h - 0.5 * length * np.sin(angle)
        ox, oy = _keep_inside(_ITEMS[name], ox, oy, length, angle, h, w)
        for part in _ITEMS[name]:
            _absorb(t, rng, _draw_part(h, w, part, ox, oy, length, angle), part[0], 0.02 * length)
        names.append(name)
    t = raster.blur(t, 0.5)
    article = {"cartridges": "", "scissors": "a pair of "}
    return blend.transmittance_to_rgba(t).astype(np.float32), "an X-ray image of " + " and ".join(
        article.get(n, "a ") + n for n in names)


def _curve(rng, h, w, n=40):
    p = np.array([rng.uniform(0, w), rng.uniform(0, h)])
    d = rng.uniform(0, 2 * np.pi)
    pts = []
    for _ in range(n):
        d += rng.normal(0, 0.25)
        p = p + min(h, w) / n * 1.2 * np.array([np.cos(d), np.sin(d)])
        pts.append(tuple(p))
    return pts


def xray_bag(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, str]:
    """A baggage scan: bag frame, clothes, electronics, cables, bottles."""
    s = min(h, w) / 512.0
    t = np.ones((h, w, 3), np.float32)

    inside = None

    def add(mask, material, sigma=3.0):
        if inside is not None:
            mask = mask * inside
        _absorb(t, rng, mask, material, sigma * s)

    m = rng.uniform(0.02, 0.08)
    box = [(w * m, h * m), (w * (1 - m), h * (1 - m))]
    c = raster.Canvas(h, w)
    c.draw.rounded_rectangle(c._p(box), radius=int(40 * s * c.ss), fill=255)  # pylint: disable=protected-access
    inside = c.mask()
    add(inside * 0.35, "organic", 20)
    c = raster.Canvas(h, w)
    c.draw.rounded_rectangle(c._p(box), radius=int(40 * s * c.ss), outline=255,  # pylint: disable=protected-access
                             width=int(4 * s * c.ss))
    add(c.mask(), "metal", 1)
    for _ in range(int(rng.integers(3, 7))):  # clothes: folded soft blobs
        r = rng.uniform(70, 200) * s
        pts = raster.wobbly_ellipse(rng, rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h, r,
                                    r * rng.uniform(0.5, 1), rng.uniform(0, np.pi), wobble=0.5)
        folds = raster.smooth_noise(rng, h, w, rng.uniform(15, 45) * s, octaves=3)
        add(raster.Canvas(h, w).polygon(pts).mask() * (0.35 + 0.65 * folds), "organic", 8)
    for _ in range(int(rng.integers(0, 3))):  # electronics with components
        ew, eh = rng.uniform(100, 260) * s, rng.uniform(60, 160) * s
        ex, ey = rng.uniform(0.1 * w, 0.9 * w - ew), rng.uniform(0.1 * h, 0.9 * h - eh)
        rect = [(ex, ey), (ex + ew, ey), (ex + ew, ey + eh), (ex, ey + eh)]
        add(raster.Canvas(h, w).polygon(rect).mask(), "mixed", 4)
        comp = raster.Canvas(h, w)
        for _ in range(int(rng.integers(3, 12))):
            cw, ch = rng.uniform(6, 40) * s, rng.uniform(6, 30) * s
            cx, cy = rng.uniform(ex, ex + ew - cw), rng.uniform(ey, ey + eh - ch)
            comp.polygon([(cx, cy), (cx + cw, cy), (cx + cw, cy + ch), (cx, cy + ch)])
        add(comp.mask(), "metal", 1)
    for _ in range(int(rng.integers(0, 4))):  # cables
        add(raster.Canvas(h, w).line(_curve(rng, h, w), width=rng.uniform(2, 6) * s).mask(),
            str(rng.choice(["mixed", "metal"])), 1)
    for _ in range(int(rng.integers(0, 3))):  # bottles of liquid
        height = rng.uniform(120, 260) * s
        prof, ratio, _ = _GLASSES["bottle"]
        radius = np.interp(np.linspace(0, 1, 48), [p[0] for p in prof], [p[1] for p in prof]) * height / ratio / 2
        poly = raster.profile_polygon(0, -height / 2, height, radius)
        ang, cx, cy = rng.uniform(0, 2 * np.pi), rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h
        ca, sa = np.cos(ang), np.sin(ang)
        poly = [(cx + ca * x - sa * y, cy + sa * x + ca * y) for x, y in poly]
        add(raster.Canvas(h, w).polygon(poly).mask(), "organic", 10)
    t = raster.blur(t, 0.7 * s) + rng.normal(0, 0.008, (h, w, 1)).astype(np.float32)
    return np.clip(t, 0, 1), "an X-ray scan of a bag with clothes, cables and electronics"


# ------------------------------------------------------------------ cells
_STAINS = {"green": (.25, 1.0, .35), "red": (1.0, .3, .25), "magenta": (1.0, .3, .9),
           "yellow": (1.0, .9, .3), "cyan": (.3, .9, 1.0), "orange": (1.0, .6, .2)}


def _cells(rng, h, w, n, r_range, stain, nucleus, body_gain):
    s = min(h, w) / 512.0
    light = np.zeros((h, w, 3), np.float32)
    grain = raster.smooth_noise(rng, h, w, 6 * s, octaves=2)
    colour = np.asarray(_STAINS[stain], np.float32)
    for _ in range(n):
        r = rng.uniform(*r_range) * s
        cx, cy = rng.uniform(0, w), rng.uniform(0, h)
        # draw in a local box around the cell, then add into the image
        pad = int(1.5 * r + 6)
        x0, y0 = max(0, int(cx) - pad), max(0, int(cy) - pad)
        x1, y1 = min(w, int(cx) + pad), min(h, int(cy) + pad)
        if x1 <= x0 or y1 <= y0:
            continue
        bh, bw, lx, ly = y1 - y0, x1 - x0, cx - x0, cy - y0
        ang = rng.uniform(0, np.pi)
        body = raster.Canvas(bh, bw).polygon(raster.wobbly_ellipse(
            rng, lx, ly, r, r * rng.uniform(0.6, 1.0), ang, wobble=0.35)).mask()
        body = raster.blur(body, 1.2 * s)
        membrane = np.clip(2.0 * body * (1.0 - raster.blur(body, 0.12 * r)), 0, 1)
        g = grain[y0:y1, x0:x1]
        inten = body_gain * (body * rng.uniform(0.6, 1.2) * (0.7 + 0.3 * g) + 0.35 * membrane)
        patch = inten[..., None] * colour
        if nucleus is not None:
            nr = r * rng.uniform(0.3, 0.5)
            off = rng.uniform(-0.3, 0.3, 2) * r
            nuc = raster.Canvas(bh, bw).polygon(raster.wobbly_ellipse(
                rng, lx + off[0], ly + off[1], nr, nr * rng.uniform(0.7, 1.0), ang, wobble=0.2)).mask()
            nuc = raster.blur(nuc, 1.5 * s) * (0.75 + 0.25 * g)
            patch += (nuc * rng.uniform(0.3, 0.55))[..., None] * np.asarray(nucleus, np.float32)
        light[y0:y1, x0:x1] += patch
    return light


def cell(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, str]:
    """Overlapping semi-transparent fluorescent cells (emission on black)."""
    stain = str(rng.choice(list(_STAINS)))
    blue = rng.random() < 0.6
    n = int(rng.uniform(4, 16) * max(1.0, h * w / 512**2))
    light = _cells(rng, h, w, n, (25, 65), stain, (.25, .4, 1.0) if blue else _STAINS[stain], 0.28)
    rgba = blend.emission_to_rgba(np.clip(light, 0, 1))
    nuc = " with blue nuclei" if blue else ""
    return rgba, f"semi-transparent overlapping {stain} fluorescent cells{nuc}"


def microscopy(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, str]:
    """A dim fluorescence field: dark tinted base, out-of-focus cells, noise."""
    base = np.asarray(_STAINS[str(rng.choice(list(_STAINS)))], np.float32) * rng.uniform(0.02, 0.06)
    n = int(rng.uniform(6, 30) * max(1.0, h * w / 512**2))
    stain = str(rng.choice(list(_STAINS)))
    light = _cells(rng, h, w, n, (15, 45), stain, None, rng.uniform(0.12, 0.3))
    light = raster.blur(light, rng.uniform(1, 5) * min(h, w) / 512)
    vign = 1.0 - 0.4 * raster.radial(h, w, h / 2, w / 2, h * 0.8, w * 0.8) ** 2
    img = (base + light) * vign[..., None] + rng.normal(0, 0.01, (h, w, 1)).astype(np.float32)
    return np.clip(img, 0, 1), f"a dark fluorescence microscopy field with blurred {stain} cells"
