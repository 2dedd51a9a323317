"""graphopt.passes."""
