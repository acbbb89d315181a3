"""Summarise a ``py-spy record --threads --format raw`` profile of a job's driver by thread and by step.

cProfile sees only the main thread; the driver's other threads (Ray Data's streaming executor, its
prefetch thread, Ray's core worker) spend much of its CPU (``bench/orchestration.py``). py-spy samples
every thread. This groups the samples taken inside ``run_job`` and in threads: by the thread's entry
function, and for the main thread by the ``run_job``/``stream_and_commit`` callee, with the most common
stacks under each.

    flock /tmp/sdbatch-ray.lock .venv/bin/py-spy record --threads --nonblocking --format raw -o /tmp/spy.raw \\
        -- .venv/bin/python bench/orchestration.py --rows 20000 --batch-size 32
    .venv/bin/python bench/pyspy_summary.py /tmp/spy.raw
"""

from __future__ import annotations

import collections
import re
import sys

THREAD_FRAMES = re.compile(r"(Thread\._bootstrap|Thread\._bootstrap_inner|Thread\.run) ")


def short(frame: str) -> str:
    """``func (file.py:line)`` with the path cut after site-packages/ or the repository root."""
    def cut(m: re.Match) -> str:
        return " (" + ("" if m.group(1) == "site-packages" else m.group(1) + "/")

    return re.sub(r"\s+\(.*/(site-packages|batch|bench)/", cut, frame)[:110]


def summarise(lines: list[str], top: int = 14, sub_top: int = 4) -> str:
    """The report: one line per group (samples, share), its most common stacks below it."""
    groups: collections.Counter = collections.Counter()
    sub: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    for line in lines:
        stack, n = line.rsplit(" ", 1)
        names = [short(f) for f in stack.split(";")[1:]]  # the first item is the thread id
        if any(x.startswith("Thread._bootstrap ") for x in names):
            body = [x for x in names if not THREAD_FRAMES.match(x)]
            key, rest = "thread: " + (body[0] if body else "?"), body[1:4]
        else:
            anchor = next((a for a in ("stream_and_commit ", "run_job ") if any(x.startswith(a) for x in names)), None)
            if anchor is None:
                continue  # outside the job (imports, clean-up)
            i = max(k for k, x in enumerate(names) if x.startswith(anchor))
            key = f"main/{anchor.strip()}: " + (names[i + 1] if i + 1 < len(names) else "self")
            rest = names[i + 2:i + 5]
        groups[key] += int(n)
        sub[key][" > ".join(rest)] += int(n)
    total = sum(groups.values()) or 1
    out = [f"samples in run_job and the driver's threads: {total}"]
    for key, n in groups.most_common(top):
        out.append(f"{n:6d} {n / total:6.1%}  {key}")
        out += [f"{'':14}{m:6d}  {stack[:200]}" for stack, m in sub[key].most_common(sub_top)]
    return "\n".join(out)


if __name__ == "__main__":
    print(summarise(open(sys.argv[1]).read().splitlines()))
