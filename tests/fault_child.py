"""`python tests/fault_child.py KIND N DELAY -- TRAIN_ARGS...`: `python -m dd_jax.train TRAIN_ARGS` that SIGKILLs
itself (no handler runs, nothing is flushed) at a chosen point:

  step N     when the batch of step N + 1 is fetched (N steps dispatched, possibly still running)
  save N     DELAY seconds after the N-th checkpoint save started (its files written in the background)
  commit N   when the N-th checkpoint's files are all written, just before orbax renames it into place

Used by tests/test_faults.py."""

from __future__ import annotations

import os
import signal
import sys
import time


def _kill():
    os.kill(os.getpid(), signal.SIGKILL)


def main() -> None:
    kind, n, delay = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
    args = sys.argv[sys.argv.index("--") + 1:]
    from dd_jax import hostmem

    hostmem.keep_freed_host_memory()  # as python -m dd_jax.train does
    from dd_jax import train

    calls = {"n": 0}
    if kind == "step":
        real = train.device_batch

        def device_batch(*a, **k):
            calls["n"] += 1
            if calls["n"] == n + 1:
                _kill()
            return real(*a, **k)

        train.device_batch = device_batch
    elif kind == "save":
        import orbax.checkpoint as ocp

        real = ocp.CheckpointManager.save

        def save(self, *a, **k):
            out = real(self, *a, **k)
            calls["n"] += 1
            if calls["n"] == n:
                time.sleep(delay)
                _kill()
            return out

        ocp.CheckpointManager.save = save
    elif kind == "commit":
        from orbax.checkpoint._src.path import atomicity

        real = atomicity.AtomicRenameTemporaryPath.finalize

        async def finalize(self, *a, **k):
            if f"{os.sep}checkpoints{os.sep}" in str(self._final_path):
                calls["n"] += 1
                if calls["n"] == n:
                    _kill()
            return await real(self, *a, **k)

        atomicity.AtomicRenameTemporaryPath.finalize = finalize
    else:
        raise SystemExit(f"unknown kind {kind!r}")

    from absl import app

    sys.argv = ["dd_jax.train"] + args
    train._define_flags()
    app.run(train.main, flags_parser=train._parse_flags)


if __name__ == "__main__":
    main()
