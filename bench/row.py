#!/usr/bin/env python
"""One row of bench/gpu.sh: run a benchmark command under a time limit and append its JSON line at once.

    python bench/row.py --out OUT.jsonl --name NAME --cap SECONDS [--need SECONDS] [--deadline EPOCH] -- CMD...

CMD prints one JSON object (its last stdout line that parses as one). The row written to OUT (appended,
flushed and fsynced the moment it is measured, so a run cut off later keeps it) is that object with ``row``,
``part``, ``device``, ``commit`` (env BENCH_COMMIT), ``command`` and ``wall_s`` (the whole command, start-up
and compilation included) in front. CMD runs in its own process group, killed whole (bench_train's training
child too) after ``min(cap, deadline - now)`` seconds; a row that fails or runs out of time is written with
``error`` and the tail of its stderr instead of numbers, and one whose ``need`` exceeds the time left before
``deadline`` is written as ``skipped`` without running. CMD's stderr goes to env BENCH_LOG (default
OUT with .log). Exit status: 0 measured or skipped, 1 failed. Standard library only.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path


def command_text(cmd: list[str]) -> str:
    """The command as a person would type it in the repo: the interpreter written ``python``."""
    head = "python" if Path(cmd[0]).name.startswith("python") else cmd[0]
    return shlex.join([head, *cmd[1:]])


def last_json(stdout: str) -> dict | None:
    for line in reversed(stdout.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except json.JSONDecodeError:
                continue
    return None


def append(out: Path, record: dict) -> None:
    line = json.dumps(record)
    with open(out, "a") as f:
        f.write(line + "\n")
        f.flush()
        os.fsync(f.fileno())
    print(line, flush=True)


def kill_group(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 5), (signal.SIGKILL, 5)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


def main(argv: list[str]) -> int:
    if "--" not in argv:
        sys.exit("usage: row.py --out OUT --name NAME --cap S [--need S] [--deadline EPOCH] -- CMD...")
    split = argv.index("--")
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--name", required=True)
    parser.add_argument("--cap", type=float, required=True, help="the most seconds this row may take")
    parser.add_argument("--need", type=float, default=0.0, help="do not start with less time than this left")
    parser.add_argument("--deadline", type=float, default=None, help="epoch seconds by which the part must end")
    args, cmd = parser.parse_args(argv[:split]), argv[split + 1:]
    head = {"row": args.name, "part": os.environ.get("BENCH_PART", ""),
            "device": os.environ.get("BENCH_DEVICE", "unknown"), "commit": os.environ.get("BENCH_COMMIT", "unknown"),
            "command": command_text(cmd)}
    left = args.deadline - time.time() if args.deadline else float("inf")
    if left < max(args.need, 1.0):
        append(args.out, {**head, "skipped": f"{max(left, 0):.0f} s left of the part's budget, the row needs "
                                             f"about {args.need:.0f} s"})
        return 0
    limit = min(args.cap, left)
    log = Path(os.environ.get("BENCH_LOG") or args.out.with_suffix(".log"))
    with open(log, "a") as f:
        f.write(f"\n== {time.strftime('%H:%M:%S')} row {args.name} (limit {limit:.0f} s): {head['command']}\n")
        offset = f.tell()
    start = time.time()
    with open(log, "a") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
        try:
            stdout, _ = proc.communicate(timeout=limit)
            error = f"exit status {proc.returncode}" if proc.returncode else None
        except subprocess.TimeoutExpired:
            kill_group(proc)
            stdout, _ = proc.communicate()
            error = f"killed after {limit:.0f} s (row cap {args.cap:.0f} s" + (
                f", {left:.0f} s were left of the part's budget)" if args.deadline else ")")
    wall = round(time.time() - start, 1)
    result = last_json(stdout) if not error else None
    if result is None:
        with open(log) as f:
            f.seek(offset)
            tail = (stdout.strip() + "\n" + f.read()).strip()[-1500:]
        append(args.out, {**head, "error": error or "no JSON line on stdout", "wall_s": wall, "stderr_tail": tail})
        return 1
    head["device"] = result.pop("device", None) or head["device"]
    result.pop("commit", None)  # bench/gpu.sh's (git, else the wheelhouse's record) is the one for every row
    result.pop("command", None)
    append(args.out, {**head, "wall_s": wall, "cap_s": args.cap, **result})
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
