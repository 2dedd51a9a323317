"""graphopt.runtime: a numpy/int8 executor for ONNX graphs (see session.py)."""

from graphopt.runtime.session import InputSpec, Session

__all__ = ["Session", "InputSpec"]
