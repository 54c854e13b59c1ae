"""Run one command and record its wall time and peak memory: the wrapper around every run that bench_speed.py times.

    python measure.py RESULT.json LOG -- COMMAND...

COMMAND's output goes to LOG. RESULT.json gets the wall time from start to exit, the return code, the peak RSS
of the largest process of its tree (getrusage(RUSAGE_CHILDREN).ru_maxrss: a fresh wrapper per run, so no earlier
child counts), the peak of the summed RSS of its process tree polled every 50 ms (with psutil), and its CPU time.
Standard library (and psutil) only, so that the wrapper costs the measured command nothing.
"""

import json
import resource
import subprocess
import sys
import time
from pathlib import Path

try:
    import psutil
except ImportError:
    psutil = None


def tree_rss(root) -> int:
    """The summed RSS of `root` and its descendants (processes that exit meanwhile are skipped)."""
    total = 0
    for proc in [root, *root.children(recursive=True)]:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total


def run(command: list[str], log_file: str) -> dict:
    tree_peak = 0
    with open(log_file, "wb") as out:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
        root = psutil.Process(process.pid) if psutil else None
        while process.poll() is None:
            if root is not None:
                try:
                    tree_peak = max(tree_peak, tree_rss(root))
                except psutil.Error:
                    pass
            time.sleep(0.05)
        wall = time.perf_counter() - start
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"wall_s": wall, "returncode": process.returncode, "maxrss_bytes": usage.ru_maxrss * 1024,
            "tree_peak_bytes": tree_peak or None, "user_s": usage.ru_utime, "sys_s": usage.ru_stime}


if __name__ == "__main__":
    result_file, log_file, separator, *command = sys.argv[1:]
    if separator != "--" or not command:
        raise SystemExit(__doc__)
    Path(result_file).write_text(json.dumps(run(command, log_file)))
