"""`dsd-fast ARGS` that SIGKILLs itself at a chosen point (tests/test_kill9.py): `python kill9_child.py SPEC ARGS...`.

SPEC is JSON: {"run": RUN_DIR, "kind": ..., "at": N, ...}. The point is counted from the moment RUN_DIR/last.pt
exists (before it a killed run has nothing to resume from, by design), and the process then dies exactly as
under an external `kill -9` (no handler, no flush, no cleanup):
- "bytes": in the middle of a file write, once N bytes have gone into atomic writes (checkpoints, snapshots,
  options.json, metrics.jsonl rewrites), the chunk that crosses N written only up to N;
- "replace": at the N-th os.replace into RUN_DIR, before it ("before": true: a complete .tmp file, not renamed)
  or after it (renamed, directory not yet synced);
- "metrics": in the middle of the N-th metrics.jsonl append (half the line written: a torn last line);
- "none": not at all (the reference run and the final resume).
The kills are self-inflicted so that where they land is a function of the test's seed, not of the machine's speed.
"""

import json
import os
import signal
import sys


def die():
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install(spec):
    from dsd_fast import rundir

    run, kind, at = spec["run"], spec["kind"], spec.get("at", 0)
    armed = lambda: os.path.exists(os.path.join(run, "last.pt"))
    count = [0]

    if kind == "bytes":
        original = rundir._RecordingFile.write

        def write(self, data):
            if armed():
                data = memoryview(data).cast("B")
                if count[0] + len(data) >= at:
                    self.f.write(data[:at - count[0]])
                    self.f.flush()
                    die()
                count[0] += len(data)
            return original(self, data)

        rundir._RecordingFile.write = write
    elif kind == "replace":
        original_replace = os.replace

        def replace(src, dst, *args, **kwargs):
            mine = armed() and os.path.dirname(os.path.abspath(dst)) == os.path.abspath(run)
            if mine:
                count[0] += 1
            if mine and count[0] == at and spec["before"]:
                die()
            original_replace(src, dst, *args, **kwargs)
            if mine and count[0] == at:
                die()

        os.replace = replace
    elif kind == "metrics":
        def log(self, record):
            if not self.writer:
                return
            line = json.dumps(record) + "\n"
            with open(self.file("metrics.jsonl"), "a") as f:
                if armed():
                    count[0] += 1
                    if count[0] == at:
                        f.write(line[:len(line) // 2])
                        f.flush()
                        die()
                f.write(line)

        rundir.RunDir.log = log
    elif kind != "none":
        raise ValueError(f"kind: expected bytes, replace, metrics or none, got {kind!r}")


if __name__ == "__main__":
    install(json.loads(sys.argv[1]))
    from dsd_fast.cli import main

    main(sys.argv[2:], prog_name="dsd-fast")
