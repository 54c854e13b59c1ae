"""Run many distmerge merges in one process, through the click command that the `distmerge` console script calls.

    python benchmarks/distmerge_batch.py JOBS.json FAILURES.json [MERGE OPTION...]

JOBS.json: a list of [config, output directory]; each runs as `distmerge merge CONFIG -o OUT --quiet --force
MERGE OPTION...`. FAILURES.json gets {output directory: traceback} for the merges that raised. Started by
compare_mergekit.py and compare_fusionbench.py (common.start_batch), the counterpart of the peers' batch drivers.
"""

import json
import sys
import traceback
from pathlib import Path

from distmerge.cli import cli


def run_all(jobs: list, options: list[str]) -> dict:
    failures = {}
    for config, out in jobs:
        try:
            cli.main(["merge", config, "-o", out, "--quiet", "--force", *options], standalone_mode=False)
        except BaseException:  # however a merge fails, it is reported and the next one runs
            failures[out] = traceback.format_exc(limit=4)
    return failures


if __name__ == "__main__":
    job_file, failure_file, *merge_options = sys.argv[1:]
    Path(failure_file).write_text(json.dumps(run_all(json.loads(Path(job_file).read_text()), merge_options)))
