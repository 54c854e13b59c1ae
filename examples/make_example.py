"""Write the example checkpoints: a small Llama-shaped base and three experts fine-tuned from it.

    python examples/make_example.py            # -> examples/models/{base,helpful,honest,harmless}

The experts differ from the base as real fine-tunes do (a low-rank update, a few heavy-tailed outlier entries,
small dense noise), in bfloat16, sharded like a Hugging Face upload, with a tokenizer. Seeded: same bytes every
time.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from distmerge.architecture import llama_config
from distmerge.synthetic import make_family


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=Path(__file__).parent / "models", type=Path)
    args = parser.parse_args()
    config = llama_config(hidden=128, intermediate=344, layers=4, heads=4, kv_heads=2, vocab=512)
    paths = make_family(args.out, config=config, dtype=torch.bfloat16, shard_size=1_000_000,
                        names=["helpful", "honest", "harmless"])
    print(f"wrote {paths['base']} and {', '.join(str(p) for p in paths['experts'])}")


if __name__ == "__main__":
    main()
