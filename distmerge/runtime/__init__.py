"""Who runs the work units: this process (`local`) or Ray actors, one per GPU (`ray`).

A runtime has two jobs: `histograms` (the first pass of TIES with global trimming) and `merge` (run units,
return their records). Both call the same engine functions, so every runtime writes the same bytes.
"""

from __future__ import annotations


def make_runtime(name: str, device: str, workers: int | None = None, address: str | None = None, quiet=False):
    if name == "ray":
        from .ray import RayRuntime

        return RayRuntime(device, workers=workers, address=address, quiet=quiet)
    from .local import LocalRuntime

    return LocalRuntime(device)
