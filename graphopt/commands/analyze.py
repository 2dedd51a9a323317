"""`graphopt analyze MODEL`: where a model's FLOPs, bytes and time go, op by op.

Prints the model's characterization (FLOPs, parameters, max live activations, op intensity of the
GEMM-like ops), the top ops by predicted time with their GEMM shapes, op intensities and roofline
bound, and with `--measure` the time the graphopt runtime actually spends per op type next to the
prediction, with the Spearman rank correlation between predicted and measured per-op times.

JSON (`--json FILE`), a stable contract (schema 1; fields are only ever added):

    {
      "schema": 1, "graphopt_version": str,
      "model": {
        "path": str, "input_shapes": {name: [int, ...]},
        "flops": int,                      # multiply-add = 2; constant-foldable ops excluded
        "params": int,                     # weight elements (int64/bool index tensors excluded)
        "weight_bytes": int,               # as stored (int8 weights of QDQ models at 1 byte)
        "max_live_activation_bytes": int,  # peak live intermediates (weights, inputs excluded)
        "max_live_activation_source": "runtime" | "static",
        "predicted_ms": float, "measured_ms": float | null,
        "characterization": {              # over GEMM-like ops (Conv, ConvTranspose, Gemm, MatMul)
          "gemm_ops": int, "gemm_flops_share": float,
          "avg_intensity_weights": float | null, "min_intensity_weights": float | null,
          "avg_intensity_total": float | null, "min_intensity_total": float | null
        }                                  # avg = FLOP-weighted; intensity = FLOPs per byte
      },
      "machine": {"cpu", "isa", "target", "measured", "features", "cores", "caches",
                  "fp32_gflops", "bandwidth_gbs", "cache_bandwidth_gbs", "vector_gops",
                  "gather_gbs", "gather_strided_gbs", "op_overhead_us",
                  "int8_relative": {"fp32", "int8_acc32", "int8_acc16"},
                  "ridge_flops_per_byte"},
      "ops": [{                            # every op, topological order
        "name": str, "op_type": str, "kind": str, "kernel": str, "known": bool,
        "quantized": bool,                 # weights stored int8 (read through DequantizeLinear)
        "flops": int, "weight_bytes": int, "activation_bytes": int,   # activations in + out
        "input_bytes": int, "output_bytes": int, "im2col_bytes": int, "im2col_stride": int,
        "intensity_weights": float | null, "intensity_total": float | null,
        "gemm": {"M": int, "N": int, "K": int, "groups": int} | null,
        "bound": "compute" | "memory", "predicted_ms": float, "measured_ms": float | null
      }],
      "op_types": [{"op_type", "count", "flops", "predicted_ms", "measured_ms"}],
      "measure": {"runs": int, "measured_ms": float, "spearman": float | null,
                  "ops_compared": int} | null
    }

`kind` is the kernel class (gemm, depthwise, elementwise, reduce, copy, gather, embedding, view,
constant, other); "constant" ops compute only from constants (the light models make weights with
ConstantOfShape) and are not inference work: they are predicted at 0 and left out of FLOPs, the
op-type table and the correlation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

NAME = "analyze"
HELP = "FLOPs, bytes, op intensity, GEMM shapes and roofline time per op of a model"
SCHEMA = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", metavar="MODEL", help="ONNX model file")
    parser.add_argument("--json", metavar="FILE", help="write the full analysis as JSON")
    parser.add_argument("--plot", metavar="FILE.png",
                        help="draw the roofline and the GEMM shape scatter (needs matplotlib)")
    parser.add_argument("--measure", action="store_true",
                        help="run the model in the graphopt runtime and show measured time per op "
                             "(BLAS uses its configured threads; OPENBLAS_NUM_THREADS=1 matches "
                             "the one-core prediction)")
    parser.add_argument("--runs", type=int, default=3, metavar="N",
                        help="timed runs for --measure, after one warm-up (default 3)")
    parser.add_argument("--shape", action="append", default=[], metavar="NAME=D0,D1,...",
                        help="pin an input's shape (repeatable), e.g. x=1,3,224,224")
    parser.add_argument("--input", action="append", default=[], metavar="NAME=FILE.npy",
                        help="an example input (repeatable): fixes its shape, fed by --measure")
    parser.add_argument("--target", default="auto", metavar="TARGET",
                        help="CPU to model: auto (this machine), generic, avx2, avx512, "
                             "avx512-vnni, amx")
    parser.add_argument("--top", type=int, default=15, metavar="N",
                        help="ops to list by predicted time (default 15)")
    parser.add_argument("--remeasure", action="store_true",
                        help="retake this machine's micro-benchmark (cached per machine in "
                             "~/.cache/graphopt) instead of reusing it")


def run(args: argparse.Namespace) -> int:
    import graphopt
    from graphopt.errors import UsageError
    from graphopt.feeds import load_feed_files, parse_shape_options
    from graphopt.fsutil import write_bytes_atomic
    from graphopt.machine import TARGETS, detect_machine, modeled_machine

    if args.target not in TARGETS:
        raise UsageError(f"unknown --target {args.target!r} (choose from {', '.join(TARGETS)})")
    shapes = parse_shape_options(args.shape)
    examples = load_feed_files(args.input)
    if args.top < 0 or args.runs < 1:
        raise UsageError("--top must be >= 0 and --runs >= 1")
    if args.plot:
        _require_matplotlib()
    graph = graphopt.load(args.model)
    machine = modeled_machine(args.target, detect_machine(refresh=args.remeasure))
    report = analyze(graph, machine, input_shapes=shapes, example_inputs=examples,
                     measure_runs=args.runs if args.measure else 0, path=args.model)
    print(render_text(report, top=args.top))
    if args.json:
        write_bytes_atomic(args.json, json.dumps(report, indent=1).encode())
        print(f"\nwrote {args.json}")
    if args.plot:
        plot(report, args.plot)
        print(f"wrote {args.plot}")
    return 0


def _require_matplotlib() -> None:
    from graphopt.errors import UsageError

    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install graphopt[plot]") from None


# ---------------------------------------------------------------------------------------------
# analysis
# ---------------------------------------------------------------------------------------------
def analyze(graph, machine, *, input_shapes=None, example_inputs=None, measure_runs: int = 0,
            path: str = "", threads: int = 1) -> dict:
    """The analysis as the JSON-ready dict documented in this module's docstring."""
    import graphopt
    from graphopt.cost import CONSTANT, analyze_model
    from graphopt.machine import roofline, spearman

    cost = analyze_model(graph, input_shapes, example_inputs=example_inputs)
    if (example_inputs or measure_runs) and any(not c.known for c in cost.ops):
        # Data-dependent shapes (a Range over a sequence length...) that inference cannot
        # resolve: take them from one run on the example (or generated) inputs.
        if fill_shapes_from_run(graph, make_feeds(graph, cost.input_shapes, example_inputs),
                                [c for c in cost.ops if not c.known]):
            cost = analyze_model(graph, input_shapes, example_inputs=example_inputs, infer=False)
    ops: list[dict] = []
    for c in cost.ops:
        entry = c.to_dict()
        if c.kind == CONSTANT:
            entry.update(bound="memory", predicted_ms=0.0, measured_ms=None)
        else:
            r = roofline(c, machine, threads=threads)
            entry.update(bound=r.bound, predicted_ms=r.time_ms, measured_ms=None)
        ops.append(entry)
    inference = [o for o in ops if o["kind"] != CONSTANT]

    measure = None
    peak_source, peak = "static", cost.max_live_activation_bytes
    if measure_runs:
        measured, runs, runtime_peak = measure_ops(graph, cost.input_shapes, example_inputs,
                                                   measure_runs)
        for o in ops:
            if o["name"] in measured:
                o["measured_ms"] = measured[o["name"]] * 1e3
        pairs = [(o["predicted_ms"], o["measured_ms"]) for o in inference
                 if o["measured_ms"] is not None]
        rho = spearman([p for p, _ in pairs], [m for _, m in pairs]) if len(pairs) > 1 else None
        measure = {"runs": runs, "measured_ms": sum(m for _, m in pairs),
                   "spearman": None if rho is None or rho != rho else round(rho, 4),
                   "ops_compared": len(pairs)}
        if runtime_peak is not None:
            peak_source, peak = "runtime", int(runtime_peak)

    op_types: dict[str, dict] = {}
    for o in inference:
        row = op_types.setdefault(o["op_type"], {"op_type": o["op_type"], "count": 0, "flops": 0,
                                                 "predicted_ms": 0.0, "measured_ms": None})
        row["count"] += 1
        row["flops"] += o["flops"]
        row["predicted_ms"] += o["predicted_ms"]
        if o["measured_ms"] is not None:
            row["measured_ms"] = (row["measured_ms"] or 0.0) + o["measured_ms"]
    type_rows = sorted(op_types.values(), key=lambda r: -(r["measured_ms"] or r["predicted_ms"]))

    return {
        "schema": SCHEMA,
        "graphopt_version": graphopt.__version__,
        "model": {
            "path": path,
            "input_shapes": {k: list(v) for k, v in cost.input_shapes.items()},
            "flops": int(sum(o["flops"] for o in inference)),
            "params": cost.params,
            "weight_bytes": cost.weight_bytes,
            "max_live_activation_bytes": int(peak),
            "max_live_activation_source": peak_source,
            "predicted_ms": sum(o["predicted_ms"] for o in inference),
            "measured_ms": measure["measured_ms"] if measure else None,
            "characterization": cost.characterization().to_dict(),
        },
        "machine": machine.to_dict(),
        "ops": ops,
        "op_types": type_rows,
        "measure": measure,
    }


def fill_shapes_from_run(graph, feeds: dict, unknown_ops) -> int:
    """Run the graph once in the graphopt runtime, asking for the values whose shapes the ops in
    `unknown_ops` lack, and record their actual shapes and dtypes; returns how many were filled
    (0 when the runtime is missing or cannot run the model: the ops then stay unknown)."""
    import numpy as np

    from graphopt.errors import GraphoptError
    from graphopt.ir import np_dtype_to_onnx

    wanted: list[str] = []
    for c in unknown_ops:
        op = graph.ops[c.op_id]
        for name in (*op.inputs, *op.outputs):
            value = graph.values.get(name) if name else None
            if value is not None and value.static_shape is None and not value.is_const \
                    and name not in wanted and not graph.is_input(name):
                wanted.append(name)
    if not wanted:
        return 0
    try:
        from graphopt.runtime import Session

        results = Session(graph).run(feeds, wanted)
    except (ImportError, GraphoptError):
        return 0
    filled = 0
    for name, array in results.items():
        if isinstance(array, np.ndarray):
            value = graph.values[name]
            value.shape = tuple(int(d) for d in array.shape)
            value.dtype = value.dtype or np_dtype_to_onnx(array.dtype)
            filled += 1
    return filled


def measure_ops(graph, input_shapes, example_inputs, runs: int):
    """Seconds per op (mean over `runs` after a warm-up), the run count, and the runtime's peak
    live intermediate bytes, from the graphopt runtime's profiler."""
    from graphopt.errors import GraphoptError

    try:
        from graphopt.runtime import Session
    except ImportError:
        raise GraphoptError("--measure needs the graphopt runtime (graphopt.runtime.Session), "
                            "which this installation lacks") from None
    feeds = make_feeds(graph, input_shapes, example_inputs)
    session = Session(graph, profile=True)
    session.run(feeds)  # warm-up: first-touch allocations, lazy weights
    session.profile.reset()
    for _ in range(runs):
        session.run(feeds)
    done = session.profile.runs or runs
    per_op = {name: seconds / done for name, seconds in session.profile.by_op.items()}
    return per_op, done, getattr(session, "peak_bytes", None)


def make_feeds(graph, input_shapes, example_inputs) -> dict:
    """Example inputs where given, else seeded random data: normal floats, zero integers
    (valid indices for any embedding table), False booleans."""
    import numpy as np

    from graphopt.ir import onnx_to_np_dtype

    rng = np.random.default_rng(0)
    feeds = dict(example_inputs or {})
    for name in graph.inputs:
        value = graph.values[name]
        if name in feeds or value.is_const:
            continue
        shape = tuple(input_shapes.get(name, value.shape or ()))
        dtype = onnx_to_np_dtype(value.dtype) if value.dtype else np.dtype(np.float32)
        if dtype.kind == "f":
            feeds[name] = rng.standard_normal(shape).astype(dtype)
        else:
            feeds[name] = np.zeros(shape, dtype=dtype)
    return feeds


# ---------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------
def render_text(report: dict, top: int = 15) -> str:
    from graphopt.report import format_table, human_bytes, human_count

    model, machine = report["model"], report["machine"]
    ch = model["characterization"]
    lines = [f"model: {model['path'] or '<graph>'}  inputs: " + ", ".join(
        f"{k}={'x'.join(map(str, v))}" for k, v in model["input_shapes"].items())]
    kind = "measured" if machine["measured"] else f"modeled ({machine['target']})"
    lines.append(f"machine: {machine['cpu']}, {machine['isa']}, {machine['cores']} cores, "
                 f"fp32 {machine['fp32_gflops']} GFLOP/s per core, {machine['bandwidth_gbs']} GB/s "
                 f"({kind}); int8 vs fp32: acc32 {machine['int8_relative']['int8_acc32']}x, "
                 f"acc16 {machine['int8_relative']['int8_acc16']}x")
    lines.append("")

    def fmt(x, unit=""):
        return "-" if x is None else f"{x:.3g}{unit}"

    live = f"{human_bytes(model['max_live_activation_bytes'])} ({model['max_live_activation_source']})"
    rows = [
        ["FLOPs (multiply-add = 2)", human_count(model["flops"], "FLOP")],
        ["parameters", human_count(model["params"])],
        ["weight bytes", human_bytes(model["weight_bytes"])],
        ["max live activations", live],
        ["GEMM-like ops / share of FLOPs",
         f"{ch['gemm_ops']} / {100 * ch['gemm_flops_share']:.1f}%"],
        ["op intensity w.r.t. weights (avg / min)",
         f"{fmt(ch['avg_intensity_weights'])} / {fmt(ch['min_intensity_weights'])} FLOP/B"],
        ["op intensity w.r.t. weights+acts (avg / min)",
         f"{fmt(ch['avg_intensity_total'])} / {fmt(ch['min_intensity_total'])} FLOP/B"],
        ["predicted time", f"{model['predicted_ms']:.3f} ms"],
    ]
    if model["measured_ms"] is not None:
        rows.append(["measured time (graphopt runtime)", f"{model['measured_ms']:.3f} ms"])
        rows.append(["Spearman rho, predicted vs measured per op",
                     fmt(report["measure"]["spearman"])])
    lines.append(format_table(rows, ["characterization", "value"], align="ll"))

    if top:
        measured = report["measure"] is not None
        ranked = sorted((o for o in report["ops"] if o["kind"] != "constant"),
                        key=lambda o: -o["predicted_ms"])[:top]
        headers = ["op", "type", "M", "N", "K", "groups", "MFLOP", "I_w", "I_total", "bound",
                   "pred ms"] + (["meas ms"] if measured else [])
        op_rows = []
        for o in ranked:
            g = o["gemm"] or {}
            row = [_short(o["name"]), o["op_type"], g.get("M"), g.get("N"), g.get("K"),
                   g.get("groups"), o["flops"] / 1e6, o["intensity_weights"],
                   o["intensity_total"], o["bound"], round(o["predicted_ms"], 4)]
            if measured:
                row.append(None if o["measured_ms"] is None else round(o["measured_ms"], 4))
            op_rows.append(row)
        lines += ["", f"top {len(ranked)} ops by predicted time "
                  "(I = op intensity in FLOP per byte)", format_table(op_rows, headers)]

    type_rows = [[r["op_type"], r["count"], r["flops"] / 1e6, round(r["predicted_ms"], 3)]
                 + ([None if r["measured_ms"] is None else round(r["measured_ms"], 3)]
                    if report["measure"] else [])
                 for r in report["op_types"]]
    headers = ["op type", "count", "MFLOP", "pred ms"] + (["meas ms"] if report["measure"] else [])
    lines += ["", "by op type", format_table(type_rows, headers)]
    return "\n".join(lines)


def _short(name: str, width: int = 40) -> str:
    return name if len(name) <= width else "..." + name[-(width - 3):]


# ---------------------------------------------------------------------------------------------
# plot
# ---------------------------------------------------------------------------------------------
def plot(report: dict, path: str) -> None:
    """Roofline (attained GFLOP/s against op intensity, each op a point) and the GEMM shape
    scatter (N and K against M), side by side, written to `path`."""
    _require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    machine = report["machine"]
    ops = [o for o in report["ops"] if o["kind"] not in ("constant", "view") and o["flops"] > 0
           and o["intensity_total"]]
    fig, (ax_roof, ax_shape) = plt.subplots(1, 2, figsize=(13, 5.2))

    peak = machine["fp32_gflops"]
    bw = machine["bandwidth_gbs"]
    xs = np.logspace(-2, 4, 200)
    ax_roof.loglog(xs, np.minimum(peak, xs * bw), "k-", lw=1.5, label=f"fp32 roof ({peak} GFLOP/s)")
    for kernel, style in (("int8_acc32", "--"), ("int8_acc16", ":")):
        rel = machine["int8_relative"][kernel]
        ax_roof.loglog(xs, np.minimum(peak * rel, xs * bw), "k" + style, lw=1,
                       label=f"{kernel} roof ({rel:.2g}x)")
    use_measured = report["measure"] is not None
    kinds = sorted({o["kind"] for o in ops})
    for kind in kinds:
        pts = [o for o in ops if o["kind"] == kind]
        times = [(o["measured_ms"] if use_measured and o["measured_ms"] else o["predicted_ms"])
                 for o in pts]
        ax_roof.scatter([o["intensity_total"] for o in pts],
                        [o["flops"] / (t * 1e-3) / 1e9 for o, t in zip(pts, times)],
                        s=14, alpha=0.7, label=kind)
    ax_roof.set_xlabel("op intensity w.r.t. weights + activations (FLOP/byte)")
    ax_roof.set_ylabel(("measured" if use_measured else "predicted") + " GFLOP/s")
    ax_roof.set_title(f"roofline: {machine['cpu']} ({machine['isa']}, one core)")
    ax_roof.legend(fontsize=7, loc="lower right")
    ax_roof.grid(True, which="both", alpha=0.2)

    gemms = [o for o in ops if o["gemm"]]
    ms = [o["gemm"]["M"] for o in gemms]
    ax_shape.scatter(ms, [o["gemm"]["N"] for o in gemms], s=16, marker="o", alpha=0.7, label="N")
    ax_shape.scatter(ms, [o["gemm"]["K"] for o in gemms], s=16, marker="x", alpha=0.7, label="K")
    ax_shape.set_xscale("log")
    ax_shape.set_yscale("log")
    ax_shape.set_xlabel("M (activation rows: batch x output pixels)")
    ax_shape.set_ylabel("N (output channels) / K (reduction)")
    ax_shape.set_title("GEMM shapes (M x K activations times K x N weights)")
    ax_shape.legend(fontsize=8)
    ax_shape.grid(True, which="both", alpha=0.2)
    fig.suptitle(Path(report["model"]["path"]).name or "model")
    fig.tight_layout()
    from graphopt.fsutil import save_figure_atomic
    save_figure_atomic(fig, path, dpi=110)
