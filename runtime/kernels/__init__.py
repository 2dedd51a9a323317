"""graphopt.runtime.kernels: importing this package registers every kernel.

One module per op family; `registry.py` holds the contract. A family module that does not exist
yet (being written) is skipped; an import error inside an existing module is raised.
"""

import importlib

_FAMILIES = ("elementwise", "tensor", "reduce", "control", "sequence", "nn", "linalg", "quant")

for _family in _FAMILIES:
    try:
        importlib.import_module(f"{__name__}.{_family}")
    except ModuleNotFoundError as _exc:
        if _exc.name != f"{__name__}.{_family}":
            raise
