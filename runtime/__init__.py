"""graphopt.runtime."""
