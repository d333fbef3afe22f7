"""Benchmarks of kdkernels: ``python -m bench`` (time, memory and error against the baselines),
``python -m bench.roofline`` (a static cost model of every Triton kernel on H100/H200, no GPU needed) and
``python -m bench --gpu-check`` (``bench/gpu_check.sh``: tests, benchmark and bandwidth ratios on a GPU)."""
