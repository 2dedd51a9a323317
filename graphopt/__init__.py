"""graphopt: a graph-level inference optimizer for ONNX models on CPUs.

    import graphopt
    graph = graphopt.load("model.onnx")
    report = graphopt.optimize(graph, level="O2")
    graphopt.save(graph, "model.opt.onnx")
"""

from graphopt.errors import GraphoptError, InvalidModelError, UsageError
from graphopt.ir import Graph, Op, Value
from graphopt.onnx_io import load, save, to_model
from graphopt.pipeline import optimize

__version__ = "0.1.0"

__all__ = ["Graph", "Op", "Value", "GraphoptError", "InvalidModelError", "UsageError",
           "load", "save", "to_model", "optimize", "__version__"]
