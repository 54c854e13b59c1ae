"""Who runs the work units: this process (`local`) or Ray actors, one per GPU (`ray`).

A runtime has two jobs: `histograms` (the first pass of TIES with global trimming) and `merge` (run units,
return their records), and says where it runs (`device`, and `threads` per worker on CPU). Both call the same engine functions, so every runtime writes the same bytes.
"""

from __future__ import annotations


def make_runtime(name: str, device: str | None, workers: int | None = None, address: str | None = None,
                 threads: int | None = None, quiet: bool = False):
    """A connected runtime; its `device` and `threads` say where the work will run."""
    if name == "ray":
        from .ray import RayRuntime

        return RayRuntime(device, workers=workers, address=address, threads=threads, quiet=quiet)
    from .local import LocalRuntime

    return LocalRuntime(device or "cpu", threads=threads)
