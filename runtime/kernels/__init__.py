"""graphopt.runtime.kernels: importing this package registers every kernel.

One module per op family (registry.py holds the contract); conv.py and gemm.py are shared engines
the nn/linalg/quant kernels use, not families of their own.
"""

from graphopt.runtime.kernels import (  # noqa: F401  (imported for their registrations)
    control,
    elementwise,
    linalg,
    nn,
    quant,
    reduce,
    sequence,
    tensor,
)
