"""kdkernels test suite."""
