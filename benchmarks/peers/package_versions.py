"""Print {package: installed version} as JSON for the package names given (missing ones are left out).

    python package_versions.py mergekit torch safetensors

Run by any venv's python (standard library only), so that a result can say what it ran against.
"""

import importlib.metadata
import json
import sys

versions = {}
for name in sys.argv[1:]:
    try:
        versions[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        pass
print(json.dumps(versions))
