"""graphopt.models."""
