"""Benchmarks of kdkernels: ``python -m bench`` (time, memory and error against the baselines),
``python -m bench.compile_report`` (registers and spills of every Triton kernel, no GPU needed) and
``python -m bench --gpu-check`` (``bench/gpu_check.sh``: tests, benchmark and bandwidth ratios on a GPU)."""
