"""The physical limit of a merge: read every input tensor once and write one model's worth of output.

    python read_write.py OUT BASE MODEL...

Reads every tensor of BASE and each MODEL with safetensors (safe_open + get_tensor, one at a time) and writes the
base's tensors as the base's shards under OUT: what any merge of these checkpoints must at least do. bench_speed.py
times it like a merge; it imports only safetensors, so its start-up is no more than a tool's.
"""

import json
import sys
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import save_file


def checkpoint_files(directory: Path) -> dict[str, Path]:
    """tensor name -> the safetensors file that holds it."""
    index = directory / "model.safetensors.index.json"
    if index.exists():
        return {name: directory / file for name, file in json.loads(index.read_text())["weight_map"].items()}
    files = {}
    for file in sorted(directory.glob("*.safetensors")):
        with safe_open(str(file), "pt") as handle:
            files.update({name: file for name in handle.keys()})  # noqa: SIM118 (safe_open is not iterable)
    return files


def read_all_write_base(out: Path, models: list[Path]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    files = [checkpoint_files(m) for m in models]
    handles = {}

    def handle(path: Path):
        if path not in handles:
            handles[path] = safe_open(str(path), "pt")
        return handles[path]

    shards: dict[Path, list[str]] = {}
    for name, file in files[0].items():
        shards.setdefault(file, []).append(name)
    for shard, names in shards.items():
        kept = {}
        for name in names:
            for i, model_files in enumerate(files):
                tensor = handle(model_files[name]).get_tensor(name)
                if i == 0:
                    kept[name] = tensor
                del tensor
        save_file(kept, str(out / shard.name), metadata={"format": "pt"})


if __name__ == "__main__":
    read_all_write_base(Path(sys.argv[1]), [Path(p) for p in sys.argv[2:]])
