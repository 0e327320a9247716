"""Throughput of the AlphaBlend data path at 512x512 (not a test).

  python scripts/benchmark_data.py [--size 512] [--samples 8] [--batches 20]
      [--batch-size 4] [--workers 0,2] [--tasks xray,...] [--data-dir DIR]

Prints (1) synthesis images/s per subtask (one process; sample + PNG
encoding, i.e. what one build worker does), and (2) Grain pipeline
batches/s over a small dataset of all given subtasks (built into a temporary
directory unless --data-dir points at one), for each worker count.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from absl import flags  # noqa: E402

from dd_jax.data import alphablend, blend, build, pipeline, synth  # noqa: E402


def bench_synthesis(tasks, size, n):
    print(f"\n== synthesis at {size}x{size}, one process (sample + PNG encode) ==")
    rates = {}
    for task in tasks:
        s = synth.Synthesizer(task, size, size, seed=0)
        alphablend.encode(s.sample(0))  # warm caches (bundled photos, fonts)
        t0 = time.perf_counter()
        for i in range(1, n + 1):
            alphablend.encode(s.sample(i))
        rates[task] = n / (time.perf_counter() - t0)
        print(f"  {task:10s} {rates[task]:6.2f} images/s")
    print(f"  {'mean':10s} {sum(rates.values()) / len(rates):6.2f} images/s")
    return rates


def bench_pipeline(data_dir, tasks, size, batch_size, batches, workers):
    print(f"\n== pipeline at {size}x{size}, batch {batch_size}, tasks {','.join(tasks)} ==")
    for w in workers:
        ds = pipeline.make_pipeline(data_dir, tasks, height=size, width=size, batch_size=batch_size,
                                    seed=0, worker_count=w, shard_index=0, shard_count=1)
        it = iter(ds)
        t0 = time.perf_counter()
        next(it)  # includes worker start-up
        t1 = time.perf_counter()
        for _ in range(batches):
            next(it)
        dt = time.perf_counter() - t1
        print(f"  workers={w}: {batches / dt:6.2f} batches/s ({batches * batch_size / dt:6.1f} images/s; "
              f"first batch {t1 - t0:.1f}s)")
        del it


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", type=int, default=512)
    p.add_argument("--samples", type=int, default=8, help="synthesized samples per task")
    p.add_argument("--batches", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--workers", default="0,2")
    p.add_argument("--tasks", default=",".join(blend.TASKS))
    p.add_argument("--data-dir", default=None, help="a built dataset to read (default: build one)")
    p.add_argument("--skip-synthesis", action="store_true")
    args = p.parse_args(argv)
    flags.FLAGS.mark_as_parsed()  # Grain workers read absl flags
    tasks = args.tasks.split(",")
    print(f"cpus: {os.cpu_count()}, load average: {os.getloadavg()}")
    if not args.skip_synthesis:
        bench_synthesis(tasks, args.size, args.samples)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir
        if data_dir is None:
            data_dir = tmp
            t0 = time.perf_counter()
            for t in tasks:
                build.build(build.parse_args(["--task", t, "--out", tmp, "--train", "8", "--test", "0",
                                              "--size", str(args.size)]))
            print(f"\n(built {8 * len(tasks)} examples in {time.perf_counter() - t0:.1f}s)")
        bench_pipeline(data_dir, tasks, args.size, args.batch_size, args.batches,
                       [int(w) for w in args.workers.split(",")])
    return 0


if __name__ == "__main__":
    sys.exit(main())
