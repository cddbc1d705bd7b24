"""A checkpointed `stream_attention` run in its own process, for tests/test_streaming.py to kill.

    python stream_worker.py DATA_DIR CHECKPOINT_DIR OUT_PATH BUDGET

Reads ``DATA_DIR/{q,k,v}.npy`` (memory-mapped), writes the float32 output to the
memmap ``OUT_PATH`` (created if missing). It prints ``start DONE`` (quorums
already done according to the checkpoint), one ``commit DONE`` line after every
committed subproblem, and ``finished`` at the end, each flushed at once.

Test-only slowdown: ``STREAM_WORKER_DELAY`` (seconds, default 0) is slept, in
three parts, at the riskiest points of every subproblem: after its merged chunks
are written (state not yet switched), after the new state file is written but
before it is renamed into place, and after the commit. The parent kills the
process at a random moment, so the kill often lands inside a commit. The knob
is read here, never by the library.
"""

import os
import sys
import time

import numpy as np

import stream_cqsa_jax as sc
from stream_cqsa_jax._src import checkpoint, host_state


# The call's arguments besides the files; tests/test_streaming.py repeats them for its reference run.
CALL = dict(is_causal=True, local_window_size=(200, 0))


def main(data_dir: str, ckpt_dir: str, out_path: str, budget: str) -> None:
    delay = float(os.environ.get("STREAM_WORKER_DELAY", "0"))
    q_path = os.path.join(data_dir, "q.npy")
    shape = np.load(q_path, mmap_mode="r").shape
    mode = "r+" if os.path.exists(out_path) else "w+"
    out = np.memmap(out_path, dtype=np.float32, mode=mode, shape=shape)

    pause = (lambda: time.sleep(delay / 3)) if delay else (lambda: None)
    commit, merge, atomic_write = checkpoint.Checkpoint.commit, host_state.HostState.merge, checkpoint._atomic_write

    def slow_merge(self, *args):
        merge(self, *args)
        pause()

    def slow_atomic_write(path, write):
        def write_then_pause(f):
            write(f)
            f.flush()
            pause()

        atomic_write(path, write_then_pause)

    def reporting_commit(self, host, done, pairs_done):
        commit(self, host, done, pairs_done)
        print(f"commit {done}", flush=True)
        pause()

    host_state.HostState.merge = slow_merge
    checkpoint._atomic_write = slow_atomic_write
    checkpoint.Checkpoint.commit = reporting_commit
    progress = checkpoint.read_progress(ckpt_dir) if os.path.isdir(ckpt_dir) else None
    print(f"start {0 if progress is None else progress[0]}", flush=True)
    sc.stream_attention(
        q_path,
        os.path.join(data_dir, "k.npy"),
        os.path.join(data_dir, "v.npy"),
        out=out,
        memory_budget=int(budget),
        checkpoint_dir=ckpt_dir,
        progress=False,
        **CALL,
    )
    print("finished", flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:5])
