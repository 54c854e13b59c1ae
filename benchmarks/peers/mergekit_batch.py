"""Run many mergekit YAMLs in one process, through the click command that `mergekit-yaml` calls.

    python mergekit_batch.py JOBS.json FAILURES.json

JOBS.json: a list of [config, output directory, mergekit-yaml arguments...]. FAILURES.json gets {output directory: traceback} for the merges
that raised. Run by the mergekit venv's python (compare_mergekit.py): one start-up of Python and torch for all
the merges instead of one each.
"""

import json
import sys
import traceback
from pathlib import Path

from mergekit.scripts.run_yaml import main


def run_all(jobs: list) -> dict:
    failures = {}
    for config, out, *arguments in jobs:
        try:
            main([config, out, "--no-lazy-unpickle", "--quiet", "--no-write-model-card", *arguments],
                 standalone_mode=False)
        except BaseException:  # however a merge fails, it is reported and the next one runs
            failures[out] = traceback.format_exc(limit=4)
    return failures


if __name__ == "__main__":
    job_file, failure_file = sys.argv[1:3]
    Path(failure_file).write_text(json.dumps(run_all(json.loads(Path(job_file).read_text()))))
