"""The screenshot of the web app in docs/app.png: a real photo decomposed in the page, in headless Chromium.

  python scripts/app_screenshot.py [--out docs/app.png] [--model DIR]

The photo is one that photo-style training never uses (`backgrounds.HELD_OUT_PHOTOS`: china, 640x427) under
the lens flare scripts/eval_photos.py draws (a glow, a streak and hexagonal ghosts, in held-out code), saved as
`flare_china.png` so that the task comes from its name. The app (`python -m dd_jax.app`, the shipped model unless
--model) runs on a free port; the page is driven by selenium in Debian's chromium (tests/app_browser.py, which
the app's browser test uses too). Needs the app extra and chromium + chromium-driver.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [ROOT, os.path.join(ROOT, "scripts"), os.path.join(ROOT, "tests")]

import app_browser  # noqa: E402
import eval_photos  # noqa: E402

MAX_BYTES = 300_000


def photo(folder: str) -> str:
    """china under eval_photos' flare, as flare_china.png in `folder`."""
    for stem, _, task, comp, _ in eval_photos.cases():
        if stem == "china" and task == "flare":
            path = os.path.join(folder, "flare_china.png")
            Image.fromarray(comp).save(path)
            return path
    raise SystemExit("error: no held-out photo china in this install (scikit-image's data)")


def small_png(img: Image.Image, limit: int = MAX_BYTES) -> bytes:
    """PNG bytes of `img`, reduced to an adaptive palette (then fewer colours) until under `limit`."""
    for colours in (None, 256, 128, 64):
        pic = img if colours is None else img.convert("RGB").quantize(colours, method=Image.Quantize.MEDIANCUT)
        buf = io.BytesIO()
        pic.save(buf, format="PNG", optimize=True)
        if buf.tell() <= limit:
            return buf.getvalue()
    return buf.getvalue()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=os.path.join(ROOT, "docs", "app.png"))
    ap.add_argument("--model", default=None, help="model folder (default: the shipped model)")
    ap.add_argument("--width", type=int, default=1400)
    ap.add_argument("--height", type=int, default=1150)
    args = ap.parse_args(argv)
    if (why := app_browser.missing()) is not None:
        print(f"error: {why}", file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory(prefix="dd_jax_screenshot_") as tmp:
        image = photo(tmp)
        server = app_browser.App(tmp, os.path.join(tmp, "app.log"), ("--model", args.model) if args.model else ())
        try:
            with app_browser.chromium(args.width, args.height) as driver:
                panels = app_browser.decompose(driver, server.url, [image])
                shot = Image.open(io.BytesIO(driver.get_screenshot_as_png()))
        finally:
            server.stop()
        print(f"panels: {panels}; {server.requests()[-1]}", file=sys.stderr)
    data = small_png(shot)
    with open(args.out, "wb") as f:
        f.write(data)
    print(f"wrote {args.out} ({shot.size[0]}x{shot.size[1]}, {len(data) / 1000:.0f} KB)", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
