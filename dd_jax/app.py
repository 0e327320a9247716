"""A local web app: drop in photos, see and download their layers. `python -m dd_jax.app`.

    pip install -e ".[app]" && python -m dd_jax.app [--host 127.0.0.1] [--port 7860] [--model DIR]

It serves a Gradio page on http://127.0.0.1:7860 (only this machine: `--host 0.0.0.0` opens it to the network).
Upload one or several images; the task (blend law) comes from the list, or with `auto` from the file name, else
it is chosen automatically, as `python -m dd_jax.decompose` does. The page shows, for each image, the composite,
the background and the foreground on a checkerboard side by side, a before/after slider (composite | background),
the recomposition error, and the downloads: the PNG layers, the layered PSD and the JSON sidecar. The options are
the CLI's where they make sense: size (tiles at native resolution, or the whole image resized), steps, samples
(keeping the one that recomposes best, or all), passes (several overlays), seed.

Every request is a `decompose.run` (dd_jax.decompose) with the model loaded once, at start (`--model`: a model
folder or training workdir, default the shipped model): the same task choice, tiling, recomposition errors,
sidecar, PSD and one-line messages (an unreadable file, an image too large for the memory or `--max-pixels`). The
sampler is compiled once, at start, for the app's fixed batches of tiles of the model's working size, so requests
compile nothing (a new number of steps compiles once); each request prints one line with its time and the
compilations it caused. Progress is shown tile by tile; Stop ends the request after the batch of tiles in flight
(what was done is kept). Uploads and results live in a temporary folder the app owns (removed when it stops,
Ctrl-C or SIGTERM; a session's previous results when it sends the next request or closes its tab): nothing is
written beside the user's files.

The API: the endpoint `decompose` takes one image (and a task, default `auto`) and returns the background and
foreground as PNG files:

    from gradio_client import Client, handle_file
    background, foreground = Client("http://127.0.0.1:7860/").predict(
        handle_file("docs/samples/watermark_1.png"), "auto", api_name="/decompose")
"""

import argparse
import contextlib
import dataclasses
import glob
import json
import os
import shutil
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence

import numpy as np
from PIL import Image

from dd_jax import checkpoints, cli, decompose, hostmem, inference, optional, quantize as quantize_lib
from dd_jax.data import blend

DEFAULT_HOST = "127.0.0.1"  # this machine only, unless --host says otherwise
DEFAULT_PORT = 7860
AUTO = "auto"  # the task from the file name, else chosen automatically
MODEL_MODE = "the model's"  # --mode left to the model's config (sample.tile)
BATCH_SIZE = 16  # tiles per model call: one fixed shape, compiled once
PREVIEW_SIDE = 1024  # longest side of the pictures shown (the downloads are full size)
CHECKER = 16  # checkerboard squares behind the foreground, pixels of the preview
MAX_SAMPLES, MAX_PASSES, MAX_STEPS = 8, 4, 50
CACHE_SWEEP = (3600, 86400)  # gradio's delete_cache: every hour, its files older than a day
INSTALL = 'pip install -e ".[app]"'


# ------------------------------------------------------------------ compilations, counted
class Compilations:
    """Programs JAX has traced (each new shape or static argument of a jitted function, eager ops included) since
    the process started: a request of a shape seen before adds none."""

    _count = 0
    _lock = threading.Lock()
    _registered = False

    @classmethod
    def count(cls) -> int:
        if not cls._registered:
            from jax import monitoring  # pylint: disable=g-import-not-at-top

            def seen(event: str, *_args, **_kwargs) -> None:
                if event == "/jax/core/compile/jaxpr_trace_duration":
                    with cls._lock:
                        cls._count += 1

            monitoring.register_event_duration_secs_listener(seen)
            cls._registered = True
        return cls._count


# ------------------------------------------------------------------ the pictures shown
def preview(img: np.ndarray, side: int = PREVIEW_SIDE) -> Image.Image:
    """uint8 RGB or RGBA as a PIL image whose longest side is at most `side`."""
    pil = Image.fromarray(img)
    if max(pil.size) > side:
        scale = side / max(pil.size)
        pil = pil.resize((max(1, round(pil.width * scale)), max(1, round(pil.height * scale))), Image.LANCZOS)
    return pil


def on_checkerboard(rgba: np.ndarray, square: int = CHECKER, dark: bool = False) -> np.ndarray:
    """uint8 RGBA [H, W, 4] over a checkerboard -> uint8 RGB: how an image editor shows a layer. `dark`: a dark
    one, for a layer of added light (cell, flare), which a light one hides."""
    h, w = rgba.shape[:2]
    yy, xx = np.indices((h, w))
    board = np.where(((yy // square + xx // square) % 2)[..., None] == 0, *((16.0, 40.0) if dark else (255.0, 204.0)))
    alpha = rgba[..., 3:4].astype(np.float32) / 255.0
    return np.clip(np.rint(rgba[..., :3] * alpha + board * (1 - alpha)), 0, 255).astype(np.uint8)


def _save(pil: Image.Image, path: str) -> str:
    pil.save(path, format="PNG")
    return path


@dataclasses.dataclass
class Output:
    """One decomposition as the page shows it: preview PNGs and the full-size files."""

    label: str  # the input's name (and sample)
    composite: str  # previews
    background: str
    foregrounds: list[tuple[str, str]]  # (preview on a checkerboard, caption), pass 1 first
    background_file: str  # as written by decompose
    foreground_files: list[str]
    task: str
    task_from: str
    recompose_rmse: float | None  # 0-255
    psd_rmse: float | None


@dataclasses.dataclass
class Result:
    """What one request made."""

    outputs: list[Output]
    files: list[str]  # the downloads: PNG layers, PSDs, the JSON sidecar
    messages: list[str]  # one line per input skipped (the CLI's), and a Stop
    stopped: bool
    seconds: float
    compilations: int  # new ones during this request


def _how(task_from) -> str:
    """A record's `task_from` in short: `--task`, `file name`, `chosen automatically` (pass by pass)."""
    hows = task_from if isinstance(task_from, list) else [task_from]
    short = [h.split(":")[0].replace("--task", "given") for h in hows]
    return ", ".join(short)


def _outputs(records: list[dict], out: str, previews: str, names: dict[str, str], multi_sample: bool) -> list[Output]:
    """The page's pictures of the sidecar records of one request (`decompose.run`'s `images`)."""
    shown, composites = [], {}
    for n, rec in enumerate(records):
        path = rec["input"]
        label = names.get(path, os.path.basename(path)) + (f", sample {rec['sample']}" if multi_sample else "")
        if path not in composites:  # the input as decompose read it (EXIF orientation, 16 bits, alpha over white)
            img = np.clip(np.rint(decompose.read_rgb(path) * 255.0), 0, 255).astype(np.uint8)
            composites[path] = _save(preview(img), os.path.join(previews, f"{len(composites)}_composite.png"))
        files = rec["outputs"]
        bg_file = os.path.join(out, files["background"]) if "background" in files else None
        fg_kinds = sorted(k for k in files if k.startswith("foreground"))
        fg_files = [os.path.join(out, files[k]) for k in fg_kinds]
        bg = _save(preview(np.asarray(Image.open(bg_file).convert("RGB"))), os.path.join(previews, f"{n}_bg.png")
                   ) if bg_file else composites[path]
        fgs = []
        for p, (kind, f) in enumerate(zip(fg_kinds, fg_files), 1):
            rgba = np.asarray(preview(np.asarray(Image.open(f).convert("RGBA"))))
            task = rec["passes"][p - 1]["task"] if rec.get("passes") else rec["task"]
            caption = f"foreground{'' if kind == 'foreground' else ' ' + str(p)} ({task})"
            board = on_checkerboard(rgba, dark=task in blend.EMISSIVE)
            fgs.append((_save(Image.fromarray(board), os.path.join(previews, f"{n}_{kind}.png")), caption))
        shown.append(Output(label, composites[path], bg, fgs, bg_file, fg_files, rec["task"], _how(rec["task_from"]),
                            rec.get("recompose_rmse"), rec.get("psd_rmse")))
    return shown


# ------------------------------------------------------------------ the work, without the page
class Decomposer:
    """The app's work: one model, loaded once; a folder it owns for uploads and results; one request at a time.

    `run` decomposes a request's files with `decompose.run` into a new folder of the session (the session's
    previous one removed), and returns what the page shows. `stop(session)` ends the session's request in flight
    after its current batch of tiles; `forget(session)` stops it and removes its results."""

    def __init__(self, model: decompose.Model, workdir: str, max_pixels: int | None = None):
        self.model, self.workdir, self.max_pixels = model, workdir, max_pixels
        self.lock = threading.Lock()  # one request at a time in the model
        self.stops: dict[str, threading.Event] = {}
        self.folders: dict[str, str] = {}  # session -> its last request's folder
        self.requests = 0
        self.results_dir = os.path.join(workdir, "dd_jax-results")
        os.makedirs(self.results_dir, exist_ok=True)
        Compilations.count()  # counting from now

    @property
    def steps(self) -> int:
        return int(self.model.system.config.sample.steps)

    @property
    def default_mode(self) -> str:
        return inference.default_mode(self.model.system.config)

    def describe(self) -> str:
        h, w = inference.working_size(self.model.system)
        name = "the shipped model" if self.model.path == checkpoints.DEFAULT_MODEL else self.model.path
        return (f"{name}: {h}x{w} working size, {self.steps} steps, {self.default_mode} mode by "
                f"default{', task head' if self.model.head is not None else ''}")

    def warm_up(self) -> None:
        """Compiles what a request runs (the sampler for batches of `BATCH_SIZE` tiles, the task choice) on a
        small grey image, so that the first request compiles nothing."""
        folder = tempfile.mkdtemp(dir=self.workdir, prefix="warm-up-")
        try:
            path = os.path.join(folder, "warm-up.png")
            Image.fromarray(np.full((32, 32, 3), 128, np.uint8)).save(path)
            with open(os.devnull, "w") as null, contextlib.redirect_stderr(null):  # its lines say nothing here
                decompose.run([path], os.path.join(folder, "out"), model=self.model, batch_size=BATCH_SIZE)
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def stop(self, session: str | None) -> None:
        if session in self.stops:
            self.stops[session].set()

    def forget(self, session: str | None) -> None:
        self.stop(session)
        folder = self.folders.pop(session, None)
        if folder:
            shutil.rmtree(folder, ignore_errors=True)

    def run(self, paths: Sequence[str], session: str | None = None, *, task: str = AUTO, steps: int | None = None,
            seed: int = 0, num_samples: int = 1, best: bool = False, passes: int = 1, mode: str | None = None,
            psd: bool = True, progress: Callable[[str, int, int], None] | None = None) -> Result:
        """Decomposes `paths` (uploads: their names are the user's) with the CLI's machinery; ValueError (one
        line) for settings it refuses."""
        stop = self.stops[session] = threading.Event()
        with self.lock:
            t0, compiled = time.time(), Compilations.count()
            self.requests += 1
            old = self.folders.pop(session, None)
            if old:
                shutil.rmtree(old, ignore_errors=True)
            folder = self.folders[session] = tempfile.mkdtemp(dir=self.results_dir, prefix=f"{self.requests}-")
            out, previews = os.path.join(folder, "layers"), os.path.join(folder, "previews")
            os.makedirs(previews)

            def hook(label: str, done: int, total: int) -> None:
                if stop.is_set():
                    raise decompose.Stopped
                if progress is not None:
                    progress(label, done, total)

            names = {p: os.path.basename(p) for p in paths}
            stopped = False
            try:
                summary = decompose.run(list(paths), out, model=self.model, task=None if task == AUTO else task,
                                        steps=steps, seed=int(seed), num_samples=int(num_samples),
                                        select="recompose" if best and num_samples > 1 else "all",
                                        passes=int(passes), mode=mode, fmt="both" if psd else "png",
                                        batch_size=BATCH_SIZE, max_pixels=self.max_pixels, progress=hook)
                records, skipped = summary["images"], summary["skip_messages"]
            except decompose.Interrupted:  # Stop: the sidecar holds what was written
                stopped, skipped = True, {}
                records = []
                for sidecar in glob.glob(os.path.join(out, f"{decompose.SIDECAR_PREFIX}*.json")):
                    with open(sidecar) as f:
                        records = json.load(f)["images"]
            messages = [f"skipping {names.get(p, p)}: {m.replace(p, names.get(p, p))}" for p, m in skipped.items()]
            if stopped:
                messages.append(f"stopped: {len(records)} decomposition(s) finished before Stop are shown")
            outputs = _outputs(records, out, previews, names, num_samples > 1 and not best)
            files = sorted(os.path.join(out, f) for f in os.listdir(out) if not f.startswith(".")
                           ) if os.path.isdir(out) else []
            result = Result(outputs, files, messages, stopped, time.time() - t0, Compilations.count() - compiled)
        print(f"request {self.requests}: {len(paths)} image(s), {len(outputs)} decomposition(s), "
              f"{len(skipped)} skipped{', stopped' if stopped else ''}; {result.seconds:.1f} s, "
              f"{result.compilations} new compilation(s)", file=sys.stderr, flush=True)
        return result


# ------------------------------------------------------------------ the page
def _table(outputs: list[Output]) -> list[list]:
    r = lambda v: None if v is None else round(v, 2)
    return [[o.label, o.task, o.task_from, r(o.recompose_rmse), r(o.psd_rmse)] for o in outputs]


def build(dec: Decomposer):
    """The Gradio Blocks of the app (gradio imported here: only the app needs it)."""
    import gradio as gr  # pylint: disable=g-import-not-at-top

    def show(outputs: list[Output], label: str | None):
        o = next((o for o in outputs if o.label == label), outputs[0] if outputs else None)
        if o is None:
            return None, None, None, None, gr.Gallery(value=None, visible=False)
        err = "" if o.recompose_rmse is None else f" (RMSE {o.recompose_rmse:.2f}/255)"
        first = o.foregrounds[0] if o.foregrounds else (None, "foreground")
        more = o.foregrounds[1:]
        return ((o.composite, o.background), gr.Image(value=o.composite, label="Composite"),
                gr.Image(value=o.background, label=f"Background{err}"),
                gr.Image(value=first[0], label=first[1].capitalize()),
                gr.Gallery(value=[(p, c) for p, c in more], visible=bool(more)))

    def on_run(files, task, mode, steps, samples, best, passes, seed, psd, request: gr.Request,
               progress=gr.Progress()):  # noqa: B008 (gradio's way to ask for a progress bar)
        if not files:
            raise gr.Error("upload one or more images first")
        paths = [f if isinstance(f, str) else f.name for f in files]
        try:
            res = dec.run(paths, request.session_hash, task=task, steps=int(steps), seed=int(seed or 0),
                          num_samples=int(samples), best=bool(best), passes=int(passes),
                          mode=None if mode == MODEL_MODE else mode, psd=bool(psd),
                          progress=lambda label, done, total: progress((done, total), desc=label, unit="tiles"))
        except (ValueError, FileNotFoundError) as e:
            raise gr.Error(str(e)) from None
        for m in res.messages:
            gr.Warning(m)
        labels = [o.label for o in res.outputs]
        status = "\n".join([f"{len(res.outputs)} decomposition(s) in {res.seconds:.1f} s"] +
                           [f"- {m}" for m in res.messages])
        return (res.outputs, gr.Dropdown(choices=labels, value=labels[0] if labels else None,
                                         visible=len(labels) > 1),
                *show(res.outputs, labels[0] if labels else None), _table(res.outputs), res.files or None, status)

    def on_api(image, task: str = AUTO, request: gr.Request = None, progress=gr.Progress()):  # noqa: B008
        """One image (and a task, default auto) -> its background and foreground (PNG files)."""
        if not image:
            raise gr.Error("no image")
        try:
            res = dec.run([image], request.session_hash if request else None, task=task or AUTO, psd=False,
                          progress=lambda label, done, total: progress((done, total), desc=label, unit="tiles"))
        except (ValueError, FileNotFoundError) as e:
            raise gr.Error(str(e)) from None
        if not res.outputs:
            raise gr.Error("; ".join(res.messages) or "nothing was decomposed")
        o = res.outputs[0]
        return o.background_file, (o.foreground_files[0] if o.foreground_files else None)

    def on_stop(request: gr.Request):
        dec.stop(request.session_hash)

    def on_unload(request: gr.Request):
        dec.forget(request.session_hash)

    tasks = [AUTO, *blend.TASKS]
    with gr.Blocks(title="dd_jax: an image's layers", analytics_enabled=False, delete_cache=CACHE_SWEEP) as demo:
        gr.Markdown(f"### dd_jax: an image's layers\nModel: {dec.describe()}. The task `auto` comes from the "
                    f"file name ({', '.join(blend.TASKS)}), else it is chosen automatically. Background RMSE: the "
                    f"recomposition error, the input against the layers recomposed by the task's blend law.")
        outputs_state = gr.State([])
        with gr.Row():
            with gr.Column(scale=1, min_width=300):
                files = gr.File(label="Images", file_count="multiple", file_types=["image"], elem_id="images")
                task = gr.Dropdown(tasks, value=AUTO, label="Task (blend law)", elem_id="task")
                with gr.Accordion("Options", open=False):
                    mode = gr.Radio([MODEL_MODE, *inference.MODES], value=MODEL_MODE,
                                    label=f"Size: tiles at native resolution, or the whole image resized "
                                          f"(the model's: {dec.default_mode})")
                    steps = gr.Slider(1, MAX_STEPS, value=dec.steps, step=1, label="Euler steps")
                    samples = gr.Slider(1, MAX_SAMPLES, value=1, step=1, label="Samples (different noise)")
                    best = gr.Checkbox(False, label="Keep only the sample that recomposes the image best")
                    passes = gr.Slider(1, MAX_PASSES, value=1, step=1,
                                       label="Passes (several overlays, the outermost first)")
                    seed = gr.Number(0, precision=0, label="Seed")
                    psd = gr.Checkbox(True, label="Layered PSD too")
                with gr.Row():
                    run_btn = gr.Button("Decompose", variant="primary", elem_id="run")
                    stop_btn = gr.Button("Stop", variant="stop", elem_id="stop")
                status = gr.Markdown(elem_id="status")
            with gr.Column(scale=3):
                which = gr.Dropdown([], label="Image", visible=False, elem_id="which")
                with gr.Tabs():
                    with gr.Tab("Layers"):
                        with gr.Row(equal_height=True):
                            composite = gr.Image(label="Composite", type="filepath", interactive=False,
                                                 elem_id="composite", height=320)
                            background = gr.Image(label="Background", type="filepath", interactive=False,
                                                  elem_id="background", height=320)
                            foreground = gr.Image(label="Foreground, on a checkerboard", type="filepath",
                                                  interactive=False, elem_id="foreground", height=320)
                        more = gr.Gallery(label="Foregrounds of the further passes", visible=False, columns=4,
                                          height=220)
                    with gr.Tab("Before / after"):
                        slider = gr.ImageSlider(label="Composite | background", type="filepath", interactive=False,
                                                elem_id="slider", max_height=480)
                table = gr.Dataframe(headers=["image", "task", "task from", "recomposition RMSE (0-255)",
                                              "PSD RMSE (0-255)"], interactive=False, elem_id="errors")
                downloads = gr.File(label="Downloads: PNG layers, layered PSD, JSON sidecar", file_count="multiple",
                                    interactive=False, elem_id="downloads")
        shown = [slider, composite, background, foreground, more]
        run_event = run_btn.click(on_run, [files, task, mode, steps, samples, best, passes, seed, psd],
                                  [outputs_state, which, *shown, table, downloads, status], api_visibility="private",
                                  concurrency_id="model", concurrency_limit=1,
                                  show_progress_on=[composite, background, foreground])
        stop_btn.click(on_stop, None, None, cancels=[run_event], api_visibility="private")
        which.change(show, [outputs_state, which], shown, api_visibility="private", queue=False)
        # The API: one image (and a task) -> background, foreground. Components the page does not show.
        with gr.Row(visible=False):
            api_image = gr.File(label="image", type="filepath")
            api_task = gr.Dropdown(tasks, value=AUTO, label="task")
            api_bg = gr.Image(label="background", type="filepath", format="png")
            api_fg = gr.Image(label="foreground", type="filepath", format="png")
            api_btn = gr.Button()
        api_btn.click(on_api, [api_image, api_task], [api_bg, api_fg], api_name="decompose",
                      concurrency_id="model", concurrency_limit=1)
        demo.unload(on_unload)
    return demo


# ------------------------------------------------------------------ the command
def check_port(host: str, port: int) -> None:
    """ValueError (one line) when `port` cannot be listened on at `host` (in use, not an address of this
    machine): said before the model loads."""
    try:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
            s.bind((host, port))
    except OSError as e:
        raise ValueError(f"--host {host} --port {port}: cannot listen there ({e.strerror or e}); choose another "
                         f"--port (or --host)") from None


def _stop_on_sigterm() -> None:
    def handler(signum, frame):
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, handler)


def main(argv: Sequence[str] | None = None) -> int:
    ap = cli.ArgumentParser(prog="python -m dd_jax.app", description=__doc__,
                            formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--host", default=DEFAULT_HOST,
                    help=f"address to listen on (default {DEFAULT_HOST}: this machine only; 0.0.0.0: every network)")
    ap.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT})")
    ap.add_argument("--model", default=None,
                    help="trained model folder or training workdir (default: the shipped tiny model)")
    ap.add_argument("--quantize", default=None, choices=quantize_lib.QTYPES + ("none",),
                    help="store the transformer's weights quantized (as decompose --quantize)")
    ap.add_argument("--max-pixels", type=int, default=None,
                    help="refuse images with more pixels than this (default: those that would take more memory "
                         "than is available, as decompose)")
    args = ap.parse_args(argv)
    if not 0 < args.port < 65536:
        ap.error(f"--port {args.port}: not a port (1-65535)")
    if args.max_pixels is not None and args.max_pixels < 1:
        ap.error(f"--max-pixels {args.max_pixels}: at least one pixel")
    try:
        optional.require("gradio", "python -m dd_jax.app")
        check_port(args.host, args.port)
    except ValueError as e:  # optional.MissingPackage is one
        print(f"error: {e}", file=sys.stderr)
        return 2
    _stop_on_sigterm()
    with tempfile.TemporaryDirectory(prefix="dd_jax_app_") as workdir:
        # gradio keeps uploads under GRADIO_TEMP_DIR, and serves the files there as they are: the app's own folder
        os.environ["GRADIO_TEMP_DIR"] = workdir
        os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
        try:
            print(f"loading {args.model or 'the shipped model'} ...", file=sys.stderr, flush=True)
            model = decompose.load_model(args.model, quantize=args.quantize)
            dec = Decomposer(model, workdir, args.max_pixels)
            print(f"compiling the sampler for batches of {BATCH_SIZE} tiles (once) ...", file=sys.stderr, flush=True)
            dec.warm_up()
        except (FileNotFoundError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            return 130
        import gradio as gr  # pylint: disable=g-import-not-at-top

        demo = build(dec)
        theme = gr.themes.Default(font=["ui-sans-serif", "system-ui", "sans-serif"],
                                  font_mono=["ui-monospace", "monospace"])  # no web fonts: nothing fetched outside
        try:
            demo.queue(default_concurrency_limit=1).launch(
                server_name=args.host, server_port=args.port, prevent_thread_lock=True, show_error=True, quiet=True,
                ssr_mode=False, run_history=False, footer_links=["api"], theme=theme,
                allowed_paths=[workdir])
        except OSError as e:  # the port is taken
            print(f"error: --port {args.port} on {args.host}: {e}", file=sys.stderr)
            return 2
        print(f"ready: http://{args.host}:{args.port}/ (uploads and results in {workdir}, removed when the app "
              f"stops; Ctrl-C stops it)", file=sys.stderr, flush=True)
        try:
            while True:
                time.sleep(3600)
        except KeyboardInterrupt:
            print("stopping", file=sys.stderr, flush=True)
        finally:
            with contextlib.suppress(Exception):
                demo.close()
    return 0


if __name__ == "__main__":
    hostmem.keep_freed_host_memory()  # before JAX starts its CPU client
    sys.exit(main())
