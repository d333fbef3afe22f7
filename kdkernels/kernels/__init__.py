"""Triton kernels of kdkernels and their launchers (imported on first use, never by ``import kdkernels``)."""
