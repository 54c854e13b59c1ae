"""Spectral merges of one Llama-3-70B-shaped decoder layer on a GPU, and the projection to a whole 70B model.

    python benchmarks/bench_gpu_layer.py [--methods tsvm,tsvm@svd=exact,rtsvm,iso_c,iso_cts,ties] [--experts 3]
    python benchmarks/bench_gpu_layer.py --device cpu --scale 64 --methods tsvm,ties   # smoke test, no GPU

A method entry may carry parameters after `@` (`tsvm@svd=exact`).

Random weights (a base and T experts = base + low-rank update + sparse outliers + noise, bfloat16 like a real
checkpoint) for the 7 matrices of one layer (q, k, v, o: 8192-wide; gate, up, down: 28672 x 8192) and for the
128256 x 8192 embedding. For each method: seconds per layer (the method's own compute, inputs already on the GPU
in float32, as the engine hands them over), seconds for the embedding, peak GPU memory, and the projection
80 layers + embedding + lm_head = one 70B merge on one GPU (divide by the GPU count for a cluster; reading the
(T+1) x 141 GB of inputs is extra, see `distmerge plan --gpus`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

import common
from distmerge.engine import resolve_device
from distmerge.methods import TensorContext, get_method

RESULTS = common.RESULTS / "gpu_layer"
HIDDEN, INTERMEDIATE, KV, VOCAB, LAYERS = 8192, 28672, 1024, 128256, 80
LAYER = {
    "self_attn.q_proj.weight": (HIDDEN, HIDDEN), "self_attn.k_proj.weight": (KV, HIDDEN),
    "self_attn.v_proj.weight": (KV, HIDDEN), "self_attn.o_proj.weight": (HIDDEN, HIDDEN),
    "mlp.gate_proj.weight": (INTERMEDIATE, HIDDEN), "mlp.up_proj.weight": (INTERMEDIATE, HIDDEN),
    "mlp.down_proj.weight": (HIDDEN, INTERMEDIATE),
}


def inputs(shape, n_experts: int, seed: int, device: torch.device):
    gen = torch.Generator(device=device).manual_seed(seed)
    base = (0.02 * torch.randn(shape, device=device, generator=gen)).to(torch.bfloat16)
    models = torch.empty((n_experts, *shape), device=device, dtype=torch.float32)
    for t in range(n_experts):
        rank = min(64, *shape)
        update = torch.randn(shape[0], rank, device=device, generator=gen) @ torch.randn(
            rank, shape[1], device=device, generator=gen) * (0.002 / rank**0.5)
        spikes = (torch.rand(shape, device=device, generator=gen) < 0.001) * 0.02 * torch.randn(
            shape, device=device, generator=gen)
        noise = 0.0005 * torch.randn(shape, device=device, generator=gen)
        models[t] = (base.float() + update + spikes + noise).to(torch.bfloat16).float()
    return base.float(), models


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def run_method(method: str, name: str, shape, n_experts: int, params: dict,
               device: torch.device) -> tuple[float, int]:
    """Seconds of the method's compute, and its peak device memory (0 on CPUs, where it is not tracked)."""
    spec = get_method(method)
    base, models = inputs(shape, n_experts, seed=hash(name) % 2**31, device=device)
    p = spec.defaults(n_experts, **params)
    synchronize(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    spec.fn(base, models, p, TensorContext(name, model_ids=tuple(range(n_experts))))
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() if device.type == "cuda" else 0
    del base, models
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return seconds, peak


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="tsvm,tsvm@svd=exact,rtsvm,iso_c,iso_cts,ties")
    parser.add_argument("--experts", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=1, help="layers timed per method (median)")
    parser.add_argument("--skip-embedding", action="store_true")
    parser.add_argument("--out", default="gpu_layer")
    parser.add_argument("--results", type=Path, default=RESULTS,
                        help="where the JSON and markdown go (default benchmarks/results/gpu_layer)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--scale", type=int, default=1,
                        help="divide every dimension by this (a smoke test; the 70B projection then means nothing)")
    return parser.parse_args()


def time_method(entry: str, layer: dict, embedding: tuple, args, device: torch.device) -> dict:
    """One --methods entry (`method` or `method@key=value;...`): seconds per layer (median of --repeats), for the
    embedding, the 70B projection, and peak memory."""
    method, _, settings = entry.partition("@")
    params = dict(item.split("=", 1) for item in settings.split(";") if item)
    layer_seconds, peaks = [], []
    for repeat in range(args.repeats):
        total = 0.0
        for name, shape in layer.items():
            seconds, peak = run_method(method, f"model.layers.{repeat}.{name}", shape, args.experts, params, device)
            total += seconds
            peaks.append(peak)
        layer_seconds.append(total)
    per_layer = statistics.median(layer_seconds)
    embed_seconds, embed_peak = (float("nan"), 0) if args.skip_embedding else run_method(
        method, "model.embed_tokens.weight", embedding, args.experts, params, device)
    whole = LAYERS * per_layer + (0 if args.skip_embedding else 2 * embed_seconds)  # embedding and lm_head
    return {"method": method, "params": params, "seconds_per_layer": per_layer, "seconds_embedding": embed_seconds,
            "projected_70b_one_gpu_s": whole, "projected_70b_8_gpus_s": whole / 8,
            "peak_gib_layer": max(peaks) / 2**30, "peak_gib_embedding": embed_peak / 2**30}


def render(args, machine: dict, rows: list[dict]) -> str:
    shaped = "Llama-3-70B-shaped" if args.scale == 1 else f"Llama-3-70B-shaped (every dimension / {args.scale})"
    lines = [f"# One {shaped} layer on {machine['gpu']} (T = {args.experts} experts, torch "
             f"{machine['torch']}, {machine['date']})", "",
             f"Command: `python benchmarks/bench_gpu_layer.py --methods {args.methods} --experts {args.experts} "
             f"--repeats {args.repeats} --device {args.device} --scale {args.scale}`. Compute only (inputs already "
             "on the device in float32).", "",
             "| method | params | s / layer | s / embedding | 70B on 1 GPU | 70B on 8 GPUs | peak GiB (layer / emb.) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['method']} | {json.dumps(r['params']) if r['params'] else 'defaults'} | "
                     f"{r['seconds_per_layer']:.2f} | {r['seconds_embedding']:.2f} | "
                     f"{r['projected_70b_one_gpu_s'] / 60:.1f} min | {r['projected_70b_8_gpus_s'] / 60:.1f} min | "
                     f"{r['peak_gib_layer']:.1f} / {r['peak_gib_embedding']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    device = resolve_device(args.device)  # the engine's set-up (on CUDA: IEEE float32 matrix products)
    layer = {name: (rows // args.scale, cols // args.scale) for name, (rows, cols) in LAYER.items()}
    embedding = (VOCAB // args.scale, HIDDEN // args.scale)
    run_method("ties", "warmup", (1024 // args.scale, 1024 // args.scale), args.experts, {}, device)
    rows = []
    for entry in args.methods.split(","):
        rows.append(time_method(entry, layer, embedding, args, device))
        print(json.dumps(rows[-1]), flush=True)
    machine = {"gpu": common.device_name(device.type), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
               "experts": args.experts}
    common.write_results(args.results, args.out, render(args, machine, rows), {"machine": machine, "results": rows})


if __name__ == "__main__":
    main()
