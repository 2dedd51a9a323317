"""graphopt.runtime.kernels."""
