"""Differential fuzzing of the optimizer and the runtime.

generator.py    seeded random valid ONNX graphs, rich in the patterns the passes rewrite
differential.py one case through every level: onnxruntime before/after, checker, runtime
shrink.py       greedy reduction of a failing graph to a minimal reproducer
test_fuzz.py    the CI run (a few hundred seeds); benchmarks/fuzz.py runs thousands
"""
