"""Procedural foreground layers that lie over a scene: watermarks, window
occlusions (fog, rain, dirt) and lens flares.

Each generator is ``fn(rng, h, w) -> (rgba float32 [h, w, 4], description)``;
the RGBA is straight (un-premultiplied) and is composited with the task's law
in ``blend.py``. Sizes are given for a 512 px image and scale with
``min(h, w) / 512``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from dd_jax.data import blend, raster

_SYL = ("ka", "lo", "mi", "ra", "ton", "vi", "sta", "pho", "to", "ne", "lux",
        "gra", "fi", "zen", "mo", "ar", "cre", "dia", "po", "rix", "sol", "ve")
_WORDS = ("SAMPLE", "PREVIEW", "PROOF", "DRAFT", "COPYRIGHT", "WATERMARK",
          "STOCK", "PHOTO", "DO NOT COPY", "CONFIDENTIAL", "IMAGES", "STUDIO")


def _brand(rng) -> str:
    name = "".join(rng.choice(_SYL, size=int(rng.integers(2, 4))))
    style = int(rng.integers(6))
    if style == 0:
        return name.upper()
    if style == 1:
        return "\u00a9 " + name.capitalize()
    if style == 2:
        return "@" + name
    if style == 3:
        return name + rng.choice([".com", " images", " photo", "stock"])
    if style == 4:
        return str(rng.choice(_WORDS))
    return "\u00a9 " + name.capitalize() + " " + str(int(rng.integers(2009, 2026)))


def _mark_colour(rng):
    u = rng.random()
    if u < 0.55:
        return (1.0, 1.0, 1.0), "white"
    if u < 0.75:
        return (0.0, 0.0, 0.0), "black"
    hue = rng.random()
    rgb = np.clip(np.abs((hue * 6 + np.array([0.0, 4.0, 2.0])) % 6 - 3) - 1, 0, 1)
    names = ("red", "yellow", "green", "cyan", "blue", "magenta")
    return tuple(0.15 + 0.8 * rgb), names[int(round(hue * 6)) % 6]


def _logo(canvas: raster.Canvas, rng, cx, cy, size, font_rng, fonts=None) -> None:
    """A badge: circle / ring / rounded square / hexagon / star with initials
    (in one of `fonts`, default: any font on the machine)."""
    r = size / 2
    shape = int(rng.integers(5))
    if shape == 0:
        canvas.ellipse(cx, cy, r, r)
    elif shape == 1:
        canvas.ellipse(cx, cy, r, r, width=max(2, r * 0.14))
    elif shape == 2:
        canvas.draw.rounded_rectangle(
            canvas._p([(cx - r, cy - r), (cx + r, cy + r)]),  # pylint: disable=protected-access
            radius=int(r * 0.35 * canvas.ss), fill=255)
    else:
        k = 6 if shape == 3 else 5
        t = np.arange(2 * k if shape == 4 else k) * np.pi / (k if shape == 4 else k / 2)
        rr = np.where(np.arange(t.size) % 2, r * 0.45, r) if shape == 4 else np.full(t.size, r)
        canvas.polygon(list(zip(cx + rr * np.sin(t), cy - rr * np.cos(t))))
    letters = "".join(rng.choice(list("ABCDEFGHKLMNPRSTVWXZ"), size=int(rng.integers(1, 3))))
    fill = 1.0 if shape == 1 else 0.0  # knock the letters out of filled badges
    font = raster.random_font(font_rng, r * 0.9) if fonts is None else \
        raster.Font(fonts[int(font_rng.integers(len(fonts)))] if fonts else "", r * 0.9)
    canvas.text((cx, cy), letters, font, value=fill)


def watermark(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, str]:
    """A large (96-128 px at 512) mark at low opacity (< 0.25), appendix A."""
    s = min(h, w) / 512.0
    size = rng.uniform(96, 128) * s
    opacity = rng.uniform(0.12, 0.25)
    colour, cname = _mark_colour(rng)
    kind = rng.choice(["text", "logo", "logo+text", "tiled"], p=[0.4, 0.2, 0.25, 0.15])
    canvas = raster.Canvas(h, w)
    text = _brand(rng)
    cx, cy = w * rng.uniform(0.3, 0.7), h * rng.uniform(0.3, 0.7)
    if kind == "text":
        font = raster.random_font(rng, size * rng.uniform(0.55, 0.8))
        tw = font.getlength(text) / max(1.0, 0.92 * w)
        if tw > 1:  # keep the text inside the image
            font = raster.Font(font.path, font.size / tw)
        half = min(font.getlength(text) / 2, w / 2)
        cx = rng.uniform(half + 0.04 * w, max(half + 0.04 * w, w - half - 0.04 * w))
        canvas.text((cx, cy), text, font, stroke=max(0, int(rng.integers(-1, 3)) * s))
    elif kind == "logo":
        _logo(canvas, rng, cx, cy, size, rng)
    elif kind == "logo+text":
        font = raster.random_font(rng, size * 0.45)
        tl = min(font.getlength(text), 0.9 * w - size)
        x0 = w / 2 - (size + tl) / 2
        _logo(canvas, rng, x0 + size / 2, cy, size, rng)
        canvas.text((x0 + size * 1.1, cy), text, font, anchor="lm")
    else:  # tiled: a diagonal grid of the same text, as on stock photos
        font = raster.random_font(rng, size * 0.4)
        step_x = font.getlength(text) + size * 0.8
        for j, y in enumerate(np.arange(-h * 0.5, h * 1.5, size * 1.6)):
            for x in np.arange(-w * 0.5 + (j % 2) * step_x / 2, w * 1.5, step_x):
                canvas.text((x, y), text, font)
    mask = canvas.mask()
    angle = rng.uniform(-35, 35) if (kind == "tiled" or rng.random() < 0.35) else 0.0
    if angle:
        mask = raster.rotate(mask, angle, center=(cx, cy) if kind != "tiled" else None)
    layers = []
    if rng.random() < 0.3:  # soft drop shadow, as many marks have
        dark = np.asarray(colour).mean() > 0.5
        sh = raster.blur(np.roll(mask, (int(2 * s) + 1,) * 2, (0, 1)), 2.0 * s)
        layers.append(raster.layer(0.6 * sh, (0.0,) * 3 if dark else (1.0,) * 3))
    layers.append(raster.layer(mask, colour))
    rgba = raster.stack(layers) if len(layers) > 1 else layers[0]
    rgba[..., 3] *= opacity
    what = {"text": f'text watermark "{text}"', "logo": "logo watermark",
            "logo+text": f'logo and text watermark "{text}"',
            "tiled": f'repeated text watermark "{text}"'}[kind]
    return rgba, f"a semi-transparent {cname} {what}"


# Watermarks as they sit on real photos, drawn at the photo's own pixel scale
# (for native-resolution crops: a 40 px letter stays 40 px). Layouts and
# pixel sizes follow what stock sites, photographers and social apps put on
# 1-4 megapixel photos. Fonts come from `raster.training_fonts()`: the
# held-out faces (`raster.HELD_OUT_FONTS`) are kept for evaluation.
PHOTO_MARKS = ("tiled", "corner", "centre", "line", "signature", "text")
_PHOTO_MARK_P = (0.3, 0.15, 0.15, 0.15, 0.1, 0.15)
_LINES = ("All rights reserved", "Do not reproduce", "Licensed image", "Preview only", "www.{n}.com")


def _contrast(colour):
    return (0.0, 0.0, 0.0) if np.mean(colour) > 0.5 else (1.0, 1.0, 1.0)


def _text_masks(h, w, draw, outline: float):
    """(fill, outline ring) masks of `draw(canvas, stroke)` on an h x w canvas."""
    fill = draw(raster.Canvas(h, w), 0.0).mask()
    if outline <= 0:
        return fill, None
    return fill, np.clip(draw(raster.Canvas(h, w), outline).mask() - fill, 0, 1)


def watermark_photo(rng: np.random.Generator, h: int, w: int,
                    fonts: Sequence[str] | None = None) -> tuple[np.ndarray, str]:
    """One watermark of a photo, in its own pixels: tiled diagonal text, a
    corner or centred logo with text, a copyright line, a signature or a
    large word; opacity 0.15-0.8, any colour, sometimes an outline and a
    drop shadow. `fonts`: TrueType paths to draw with (default: training fonts)."""
    fonts = raster.training_fonts() if fonts is None else tuple(fonts)
    font = lambda size: raster.Font(fonts[int(rng.integers(len(fonts)))] if fonts else "", size)
    kind = str(rng.choice(PHOTO_MARKS, p=_PHOTO_MARK_P))
    opacity = rng.uniform(0.15, 0.8) if rng.random() < 0.6 else rng.uniform(0.15, 0.35)
    colour, cname = _mark_colour(rng)
    text = _brand(rng)
    outline = rng.uniform(0.8, 2.5) if rng.random() < 0.3 else 0.0
    diag = int(np.ceil(np.hypot(h, w))) + 2
    angle = 0.0
    if kind == "tiled":  # a rotated grid of one text over the whole photo
        f = font(rng.uniform(14, 56))
        gap_x, gap_y = f.getlength(text) + f.size * rng.uniform(1, 4), f.size * rng.uniform(2, 5)
        ox, oy = rng.uniform(0, gap_x), rng.uniform(0, gap_y)

        def draw(c, stroke):
            for j, y in enumerate(np.arange(-oy, diag + gap_y, gap_y)):
                for x in np.arange(-ox - (j % 2) * gap_x / 2, diag + gap_x, gap_x):
                    c.text((x, y), text, f, anchor="lm", stroke=stroke)
            return c
        fill, ring = _text_masks(diag, diag, draw, outline)
        angle = rng.choice([-1, 1]) * rng.uniform(20, 45)
        crop = lambda m: raster.rotate(m, angle)[(diag - h) // 2:(diag - h) // 2 + h,
                                                 (diag - w) // 2:(diag - w) // 2 + w]
        fill, ring = crop(fill), None if ring is None else crop(ring)
        what = f'repeated diagonal text watermark "{text}"'
    else:
        if kind in ("corner", "centre"):
            logo = rng.uniform(22, 70) if kind == "corner" else rng.uniform(40, 140)
            f = font(logo * rng.uniform(0.3, 0.55))
            tl = f.getlength(text)
            bw, bh = logo * 1.1 + tl, logo  # logo left of the text
            if kind == "corner":
                m = rng.uniform(4, 20)
                x0 = m if rng.random() < 0.5 else w - m - bw
                y0 = m if rng.random() < 0.5 else h - m - bh
            else:
                x0, y0 = (w - bw) / 2 + rng.normal(0, 0.05 * w), (h - bh) / 2 + rng.normal(0, 0.05 * h)

            def draw(c, stroke):
                _logo(c, rng_logo(), x0 + logo / 2, y0 + bh / 2, logo, rng_logo(), fonts)
                c.text((x0 + logo * 1.1, y0 + bh / 2), text, f, anchor="lm", stroke=stroke)
                return c
            seed = int(rng.integers(2**31))
            rng_logo = lambda: np.random.default_rng(seed)  # the same badge in both masks
            what = f'{"corner" if kind == "corner" else "centred"} logo watermark with the text "{text}"'
        else:
            if kind == "line":
                name = "".join(rng.choice(_SYL, size=int(rng.integers(2, 4)))).capitalize()
                year = int(rng.integers(2009, 2027))  # before the line: the draw order is the data's
                text = f"\u00a9 {year} {name}. " + str(rng.choice(_LINES)).format(n=name.lower())
                f = font(rng.uniform(10, 26))
                x, y, anchor = rng.uniform(0.02, 0.3) * w, rng.uniform(0.75, 0.97) * h, "lm"
                what = f'copyright line "{text}"'
            elif kind == "signature":
                f = font(rng.uniform(20, 60))
                text = "".join(rng.choice(_SYL, size=int(rng.integers(2, 4)))).capitalize()
                x, y, anchor = rng.uniform(0.1, 0.9) * w, rng.uniform(0.1, 0.9) * h, "mm"
                angle = rng.uniform(-15, 15)
                what = f'signature "{text}"'
            else:
                f = font(rng.uniform(30, 120))
                x, y, anchor = rng.uniform(0.2, 0.8) * w, rng.uniform(0.2, 0.8) * h, "mm"
                angle = rng.uniform(-40, 40) if rng.random() < 0.5 else 0.0
                what = f'large text watermark "{text}"'

            def draw(c, stroke):
                return c.text((x, y), text, f, anchor=anchor, stroke=stroke)
        fill, ring = _text_masks(h, w, draw, outline)
        if angle and kind != "tiled":
            fill = raster.rotate(fill, angle)
            ring = None if ring is None else raster.rotate(ring, angle)
    layers = []
    if rng.random() < 0.3:  # soft drop shadow
        d = rng.uniform(1, 4)
        sh = raster.blur(np.roll(fill if ring is None else np.maximum(fill, ring), (int(d),) * 2, (0, 1)),
                         rng.uniform(0.8, 2.5))
        layers.append(raster.layer(0.6 * sh, _contrast(colour)))
    if ring is not None:
        layers.append(raster.layer(ring, _contrast(colour)))
    layers.append(raster.layer(fill, colour))
    rgba = raster.stack(layers) if len(layers) > 1 else layers[0]
    rgba[..., 3] *= opacity
    return rgba, f"a semi-transparent {cname} {what}"


# ---------------------------------------------------------------- occlusion
def _fog(rng, h, w, s):
    dens = raster.smooth_noise(rng, h, w, rng.uniform(120, 400) * s, octaves=4)
    grad = np.linspace(*(rng.uniform(0.5, 1.0, 2)), h, dtype=np.float32)[:, None]
    alpha = rng.uniform(0.2, 0.55) * (0.45 + 0.55 * dens) * grad
    tint = np.array([0.86, 0.88, 0.92]) + rng.uniform(-0.06, 0.06, 3)
    return raster.layer(alpha, np.clip(tint, 0, 1)), "fog"


def _drops(rng, h, w, s):
    """Raindrops on glass: each drop is a small lens showing the scene upside
    down (dark top, bright bottom), with a dark rim and a specular spot."""
    body, lower, rim, spec = (raster.Canvas(h, w) for _ in range(4))
    n = int(rng.uniform(60, 400) * (h * w) / 512**2)
    rmax = rng.uniform(5, 16) * s
    for _ in range(n):
        r = float(np.exp(rng.uniform(np.log(1.5 * s), np.log(rmax))))
        x, y = rng.uniform(0, w), rng.uniform(0, h)
        ry = r * rng.uniform(1.0, 1.35)
        pts = raster.wobbly_ellipse(rng, x, y, r, ry, wobble=0.15, n=20)
        body.polygon(pts)
        lower.polygon([(px, max(py, y)) for px, py in pts])
        rim.line(pts + pts[:1], width=max(1.0, r * 0.22))
        spec.ellipse(x - 0.35 * r, y - 0.45 * ry, 0.22 * r, 0.2 * r)
        if r > 0.6 * rmax and rng.random() < 0.35:  # a drop running down leaves a trail
            ln = rng.uniform(15, 90) * s
            pts = [(x + rng.normal(0, 0.25 * r), y - t) for t in np.linspace(0, ln, 6)]
            body.line(pts, width=r * 0.5, value=0.5)
    b, lo = body.mask(), raster.blur(lower.mask(), 0.8 * s)
    shade = np.clip(0.25 + 0.7 * lo, 0, 1)[..., None] * np.array([0.95, 0.97, 1.0], np.float32)
    return raster.stack([
        raster.layer(b * rng.uniform(0.35, 0.6), shade),
        raster.layer(rim.mask() * rng.uniform(0.35, 0.6), (0.05, 0.06, 0.07)),
        raster.layer(raster.blur(spec.mask(), 0.5 * s) * 0.9, (1.0, 1.0, 1.0)),
    ]), "raindrops"


def _streaks(rng, h, w, s):
    canvas = raster.Canvas(h, w, ss=1)
    n = int(rng.uniform(150, 600) * (h * w) / 512**2)
    ang = rng.uniform(-0.35, 0.35)
    for _ in range(n):
        ln = rng.uniform(15, 60) * s
        x, y = rng.uniform(-0.1 * w, 1.1 * w), rng.uniform(-0.1 * h, 1.1 * h)
        canvas.line([(x, y), (x + ln * np.sin(ang), y + ln * np.cos(ang))],
                    width=max(1.0, rng.uniform(0.8, 2.0) * s), value=rng.uniform(0.4, 1.0))
    m = raster.blur(canvas.mask(), 0.7 * s)
    return raster.layer(m * rng.uniform(0.3, 0.6), (0.92, 0.94, 0.97)), "rain streaks"


def _dirt(rng, h, w, s):
    smudge = raster.smooth_noise(rng, h, w, rng.uniform(60, 200) * s, octaves=5)
    smudge = np.clip((smudge - rng.uniform(0.45, 0.65)) * 2.5, 0, 1)
    specks = raster.Canvas(h, w)
    for _ in range(int(rng.uniform(40, 250) * (h * w) / 512**2)):
        r = float(np.exp(rng.uniform(np.log(0.8 * s), np.log(6 * s))))
        pts = raster.wobbly_ellipse(rng, rng.uniform(0, w), rng.uniform(0, h), r, r, wobble=0.5, n=12)
        specks.polygon(pts, value=rng.uniform(0.5, 1.0))
    alpha = np.maximum(smudge * rng.uniform(0.35, 0.65), specks.mask() * rng.uniform(0.6, 0.9))
    colour = np.array([0.36, 0.3, 0.22]) * rng.uniform(0.6, 1.3)
    return raster.layer(alpha, np.clip(colour, 0, 1)), "dirt"


def _frost(rng, h, w, s):
    fine = raster.smooth_noise(rng, h, w, 6 * s, octaves=2)
    patch = raster.smooth_noise(rng, h, w, 200 * s, octaves=2)
    alpha = np.clip(patch * 1.6 - 0.5, 0, 1) * (0.5 + 0.5 * fine) * rng.uniform(0.3, 0.6)
    return raster.layer(alpha, (0.93, 0.95, 0.98)), "condensation"


_OCCLUDERS = ((_fog, 0.6), (_drops, 0.5), (_streaks, 0.25), (_dirt, 0.35), (_frost, 0.25))


def occlusion(rng: np.random.Generator, h: int, w: int, scale: float | None = None) -> tuple[np.ndarray, str]:
    """A full-image translucent window layer: fog, raindrops, rain, dirt,
    condensation (each present with its own probability, at least one).
    `scale`: sizes relative to a 512 px image (default: min(h, w) / 512)."""
    s = min(h, w) / 512.0 if scale is None else float(scale)
    picks = [i for i, (_, p) in enumerate(_OCCLUDERS) if rng.random() < p]
    if not picks:
        picks = [int(rng.integers(len(_OCCLUDERS)))]
    parts = [_OCCLUDERS[i][0](rng, h, w, s) for i in picks]
    rgba = raster.stack([p[0] for p in parts])
    names = [p[1] for p in parts]
    desc = names[0] if len(names) == 1 else ", ".join(names[:-1]) + " and " + names[-1]
    return rgba, f"translucent {desc} on a window"


# ---------------------------------------------------------------- flare
def flare(rng: np.random.Generator, h: int, w: int, scale: float | None = None) -> tuple[np.ndarray, str]:
    """A lens flare in linear light: core and glow, starburst streaks, a halo
    ring, ghosts along the line through the image centre, and sometimes an
    anamorphic streak. Returned as RGBA with alpha A == the flare on black.
    `scale`: sizes relative to a 512 px image (default: min(h, w) / 512)."""
    s = min(h, w) / 512.0 if scale is None else float(scale)
    sx, sy = rng.uniform(-0.1, 1.1) * w, rng.uniform(-0.1, 0.8) * h
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    dx, dy = xx - sx, yy - sy
    r = np.sqrt(dx * dx + dy * dy) + 1e-3
    temp = rng.choice(3)
    tint = np.array([(1.0, 0.82, 0.58), (1.0, 0.97, 0.92), (0.72, 0.85, 1.0)][temp], np.float32)
    tint = np.clip(tint + rng.uniform(-0.05, 0.05, 3), 0, 1)
    gain = rng.uniform(0.6, 1.3)
    r0, r1 = rng.uniform(6, 18) * s, rng.uniform(40, 140) * s
    lum = 1.5 * np.exp(-(r / r0) ** 2) + rng.uniform(0.25, 0.6) / (1 + (r / r1) ** 2) ** 1.3
    light = lum[..., None] * tint
    # starburst: thin rays fading with the distance, looked up from angular
    # tables (one intensity and one length per angle bin) -- cheap at any size
    theta = np.arctan2(dy, dx)
    nbins = 4096
    ang = np.linspace(-np.pi, np.pi, nbins, endpoint=False, dtype=np.float32)
    amp, num, den = np.zeros(nbins, np.float32), np.zeros(nbins, np.float32), np.full(nbins, 1e-6, np.float32)
    nr = int(rng.integers(8, 40))
    base, regular = rng.uniform(0, np.pi), rng.random() < 0.4
    for k in range(nr):
        th = base + (k * 2 * np.pi / nr if regular else rng.uniform(0, 2 * np.pi))
        d = (ang - th + np.pi) % (2 * np.pi) - np.pi
        g = rng.uniform(0.2, 1.0) * np.exp(-(d / rng.uniform(0.004, 0.02)) ** 2)
        amp += g
        num += g * rng.uniform(25, 160) * s
        den += g
    idx = ((theta + np.pi) * (nbins / (2 * np.pi))).astype(np.int32) % nbins
    length = np.maximum(num / den, 1.0)
    rays = np.minimum(amp, 1.0)[idx] * np.exp(-r / length[idx]) / (1.0 + r / (40 * s))
    light += 0.8 * raster.blur(rays, 0.6 * s)[..., None] * tint
    # halo ring with a slight chromatic spread
    if rng.random() < 0.6:
        rh, wh = rng.uniform(80, 220) * s, rng.uniform(4, 14) * s
        for c, off in enumerate((1.03, 1.0, 0.97)):
            light[..., c] += rng.uniform(0.04, 0.1) * np.exp(-((r - rh * off) / wh) ** 2)
    # ghosts: reflections between lens elements, on the line through the centre
    cxm, cym = w / 2, h / 2
    for _ in range(int(rng.integers(2, 8))):
        t = rng.uniform(0.4, 2.2)
        gx, gy = sx + t * (cxm - sx), sy + t * (cym - sy)
        gr = rng.uniform(8, 60) * s
        if rng.random() < 0.4:  # hexagonal aperture ghost
            pts = raster.wobbly_ellipse(rng, gx, gy, gr, gr, wobble=0.0, n=6)
            disc = raster.blur(raster.Canvas(h, w).polygon(pts).mask(), rng.uniform(1, 4) * s)
        else:
            rg = np.sqrt((xx - gx) ** 2 + (yy - gy) ** 2) / gr
            disc = 1.0 / (1.0 + np.exp(np.minimum((rg - 1.0) * rng.uniform(8, 30), 50.0)))
            if rng.random() < 0.4:
                disc = disc * (0.4 + 0.6 * rg.clip(0, 1) ** 4)  # brighter rim
        gcol = np.clip(tint * rng.uniform(0.3, 1.0, 3), 0, 1)
        light += rng.uniform(0.02, 0.1) * disc[..., None] * gcol
    if rng.random() < 0.3:  # anamorphic horizontal streak
        streak = np.exp(-(dy / (rng.uniform(1.5, 4) * s)) ** 2) * np.exp(-np.abs(dx) / (rng.uniform(0.2, 0.6) * w))
        light += rng.uniform(0.3, 0.7) * streak[..., None] * np.array([0.55, 0.7, 1.0], np.float32)
    display = blend.from_linear(np.clip(light * gain, 0, 1))
    display = np.where(display < 1.5 / 255, 0.0, display).astype(np.float32)  # keep the black black
    colour = ("warm", "white", "blue")[temp]
    return blend.emission_to_rgba(display), f"a {colour} lens flare with glow, streaks and ghosts"
