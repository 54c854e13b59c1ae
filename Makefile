# One command per benchmark; each writes its results to its folder under benchmarks/results/ (see benchmarks/README.md).
PY ?= python

.PHONY: test bench-speed bench-quality bench-svd bench-scaling bench-gpu-layer compare-mergekit compare-fusionbench

test:
	$(PY) -m pytest -q

bench-speed:            # distmerge vs mergekit 0.1.5 and FusionBench 0.2.33: time and peak memory
	$(PY) benchmarks/bench_speed.py

bench-quality:          # merge quality on real tasks (encoder and causal-LM tracks), CPU
	$(PY) benchmarks/quality/run.py

bench-svd:              # SVD backends and the polar step (add ARGS="--device cuda" on a GPU)
	$(PY) benchmarks/bench_svd.py $(ARGS)

bench-scaling:          # tsvm and ties: local vs the Ray runtime at 1 and 2 workers and on two raylets
	$(PY) benchmarks/bench_scaling.py $(ARGS)

bench-gpu-layer:        # spectral merges of a Llama-3-70B-shaped layer on a GPU, projected to 70B
	$(PY) benchmarks/bench_gpu_layer.py $(ARGS)

compare-mergekit:       # same YAML through mergekit and distmerge: tensor-by-tensor differences
	$(PY) benchmarks/compare_mergekit.py

compare-fusionbench:    # tsvm / iso_c / iso_cts against FusionBench's functions
	$(PY) benchmarks/compare_fusionbench.py
