"""Mutation check: do the tests catch small, plausible mistakes in the core modules?

    python scripts/mutation_check.py                  # every mutation in tests/mutations.toml
    python scripts/mutation_check.py --only flow -j 2 # names containing "flow", two at a time

Each mutation (file, an exact snippet of it, a replacement, the tests that must catch it) is applied
to a private copy of the repository (the working tree is never touched) and its tests run there with
`pytest -x -q`. A mutation is CAUGHT when its tests fail, SURVIVED when they pass; a snippet that is
not in the file exactly once is an ERROR (the list must follow the code). Before the mutations, the
union of their tests runs once on the unmutated copy (the baseline): a test that already fails would
"catch" everything. Exit status 0 only when the baseline passes and every mutation is caught.
Not part of the default test run (each mutation starts its own pytest).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import os
import shutil
import subprocess
import sys
import tempfile
import time
import tomllib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOP_LEVEL_SKIP = (".git", "data", "runs", ".pytest_cache")  # only at the root: dd_jax/data is code


def IGNORE(directory: str, names: list[str]) -> set[str]:
    top = os.path.realpath(directory) == os.path.realpath(REPO)
    return {n for n in names if n == "__pycache__" or n.endswith(".egg-info")
            or (top and (n in TOP_LEVEL_SKIP or n.startswith(".venv")))}


def load(path: str) -> list[dict]:
    with open(path, "rb") as f:
        muts = tomllib.load(f)["mutation"]
    for m in muts:
        missing = {"name", "file", "original", "replacement", "tests"} - set(m)
        if missing:
            raise SystemExit(f"mutation {m.get('name', '?')!r} lacks {sorted(missing)}")
    return muts


def copy_repo(dest: str) -> str:
    shutil.copytree(REPO, dest, ignore=IGNORE, symlinks=True)
    return dest


def run_tests(root: str, tests: list[str], timeout: float) -> tuple[int, str, float]:
    """pytest -x -q on `tests` with `root` first on the import path (ahead of the editable install)."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
               PYTHONDONTWRITEBYTECODE="1")
    start = time.time()
    try:
        r = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests],
                           cwd=root, env=env, capture_output=True, text=True, timeout=timeout)
        return r.returncode, r.stdout + r.stderr, time.time() - start
    except subprocess.TimeoutExpired as e:
        return -1, f"timeout after {timeout:.0f}s\n{e.stdout or ''}", time.time() - start


def check_imports_from(root: str, files: set[str]) -> None:
    """Every module the mutations touch must import from the copy, not from the working tree."""
    modules = sorted(f[:-3].replace("/", ".") for f in files if f.endswith(".py"))
    env = dict(os.environ, PYTHONPATH=root)
    code = "import importlib\n" + "".join(f"print(importlib.import_module({m!r}).__file__)\n" for m in modules)
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                         check=True).stdout.split()
    for f in out:
        if not os.path.realpath(f).startswith(os.path.realpath(root) + os.sep):
            raise SystemExit(f"the copy imports {f}, not its own modules: the check would test the working tree")


def mutate(root: str, m: dict) -> str | None:
    """Applies `m` in the copy at `root`; returns an error message instead when it cannot."""
    path = os.path.join(root, m["file"])
    if not os.path.isfile(path):
        return f"no file {m['file']}"
    with open(path) as f:
        src = f.read()
    n = src.count(m["original"])
    if n != 1:
        return f"snippet found {n} times in {m['file']} (must be exactly once)"
    with open(path, "w") as f:
        f.write(src.replace(m["original"], m["replacement"]))
    return None


def restore(root: str, m: dict) -> None:
    shutil.copy2(os.path.join(REPO, m["file"]), os.path.join(root, m["file"]))


def last_line(out: str) -> str:
    lines = [ln for ln in out.strip().splitlines() if ln.strip()]
    return lines[-1][:160] if lines else ""


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mutations", default=os.path.join(REPO, "tests", "mutations.toml"))
    p.add_argument("--only", default="", help="run the mutations whose name contains this text")
    p.add_argument("-j", "--workers", type=int, default=2, help="mutations tested at once (one repo copy each)")
    p.add_argument("--timeout", type=float, default=900, help="seconds per pytest run")
    p.add_argument("--no-baseline", action="store_true", help="skip the run of the unmutated tests")
    p.add_argument("--start", type=int, default=1, help="begin at this mutation (1-based; to resume a run)")
    p.add_argument("--tmp", default=os.path.join(os.path.expanduser("~"), ".cache", "dd_jax_mutation_check"),
                   help="where the repository copies live (not /tmp: other jobs may clean it mid-run)")
    p.add_argument("--list", action="store_true", help="print the mutations and exit")
    args = p.parse_args(argv)

    muts = [m for m in load(args.mutations)[max(args.start, 1) - 1:] if args.only in m["name"]]
    if args.list:
        for m in muts:
            print(f"{m['name']}\n    {m['file']}: {' '.join(m['tests'])}")
        print(f"{len(muts)} mutations")
        return 0
    if not muts:
        raise SystemExit("no mutation matches --only")

    t0 = time.time()
    os.makedirs(args.tmp, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="run_", dir=args.tmp)
    try:
        copies = [copy_repo(os.path.join(tmp, f"repo{i}")) for i in range(max(1, args.workers))]
        check_imports_from(copies[0], {m["file"] for m in muts})
        for m in muts:  # every snippet present before anything runs
            m["error"] = None
            with open(os.path.join(REPO, m["file"])) as f:
                n = f.read().count(m["original"])
            if n != 1:
                m["error"] = f"snippet found {n} times in {m['file']} (must be exactly once)"

        if not args.no_baseline:
            tests = sorted({t for m in muts for t in m["tests"]})
            rc, out, secs = run_tests(copies[0], tests, args.timeout * 2)
            print(f"baseline: {len(tests)} test ids, {'pass' if rc == 0 else 'FAIL'} ({secs:.0f}s)", flush=True)
            if rc != 0:
                print(out[-4000:])
                return 2

        free = list(copies)
        results = {}

        def one(m):
            root = free.pop()
            try:
                if not os.path.isdir(root):
                    return "ERROR", f"the copy {root} vanished", 0.0
                err = m["error"] or mutate(root, m)
                if err:
                    return "ERROR", err, 0.0
                rc, out, secs = run_tests(root, m["tests"], args.timeout)
                if rc == -1:
                    return "TIMEOUT", last_line(out), secs
                if rc == 0:
                    return "SURVIVED", last_line(out), secs
                if rc == 1:
                    return "CAUGHT", last_line(out), secs
                return "ERROR", f"pytest exit {rc}: {last_line(out)}", secs  # collection/usage errors
            finally:
                if os.path.isdir(root):
                    restore(root, m)
                free.append(root)

        with cf.ThreadPoolExecutor(max_workers=len(copies)) as pool:
            futures = {pool.submit(one, m): i for i, m in enumerate(muts)}
            for fut in cf.as_completed(futures):
                i = futures[fut]
                status, detail, secs = fut.result()
                results[i] = status
                print(f"[{len(results):3d}/{len(muts)}] {status:8s} {muts[i]['name']}  ({secs:.0f}s)"
                      + ("" if status == "CAUGHT" else f"\n           {detail}"), flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    counts = {s: sum(1 for v in results.values() if v == s) for s in ("CAUGHT", "SURVIVED", "ERROR", "TIMEOUT")}
    print(f"\n{len(muts)} mutations: {counts['CAUGHT']} caught, {counts['SURVIVED']} survived, "
          f"{counts['ERROR']} errors, {counts['TIMEOUT']} timeouts  ({(time.time() - t0) / 60:.1f} min)")
    for i in sorted(results):
        if results[i] != "CAUGHT":
            print(f"  {results[i]}: {muts[i]['name']}")
    return 0 if counts["CAUGHT"] == len(muts) else 1


if __name__ == "__main__":
    sys.exit(main())
