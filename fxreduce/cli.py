"""The ``fxreduce`` command: list passes, cost a model, rewrite and save it, inspect, verify, demo.

Every subcommand takes models by reference (fxreduce.models) and input shapes as text, so a shell line
says everything a run depends on. Errors a user can cause print one line, ``fxreduce: error: ...``, and
exit with status 2; anything else is a bug in fxreduce and keeps its traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Any, Sequence

import sympy
import torch
import torch.fx as fx

from . import __version__
from .cost_models import GraphCost, certify, graph_cost, graph_info
from .cost_models.latency import default_profile_path
from .demo import TECHNIQUES
from .errors import FxReduceError, InputError, UnsupportedError, UsageError
from .inspection import inspect
from .measurement import measure
from .models import InputShape, default_example_size, import_code, load_model, parse_input_shape
from .passes import REGISTRY, get_pass
from .pipeline import Pipeline, RewriteReport, parse_spec
from .profiling import calibrate
from .serialization import Loaded, Manifest, build, export, load, load_export, save
from .submodules import apply_to_submodules
from .testing.contracts import check_contract
from .text import count, formula
from .tracing import trace

DEMO_PIPELINE = "fold_batchnorm,remove_dropout,eliminate_dead_code"
DEFAULT_SHAPE = "N,3,H,W"
_EXPORT_SUFFIXES = (".pt2",)
_SAVE_SUFFIXES = (".pt", ".pth")
_SAVED = "(the saved model's original)"


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is an FxReduceError: one line and exit 2, like every other user error."""

    def error(self, message: str):
        raise UsageError(message, fix=f"see `{self.prog} --help`")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def _one_line(error: BaseException) -> str:
    return " ".join(line.strip() for line in str(error).splitlines() if line.strip())


def _value(expr: Any) -> int | float | str:
    """A number for JSON: int when exact, float otherwise, the formula when dims are left symbolic."""
    expr = sympy.sympify(expr)
    if expr.is_Integer:
        return int(expr)
    return float(expr) if expr.is_Number else str(expr)


def _number(expr: Any) -> str:
    value = _value(expr)
    if isinstance(value, str):
        return value
    text = f"{value:,}" if isinstance(value, int) else f"{value:.4g}"
    return text if abs(value) < 1e3 else f"{text} ({count(value)})"


def _shape(gm: fx.GraphModule) -> InputShape:
    """The example inputs and named dims a traced graph was built on."""
    spec = graph_info(gm).spec
    return InputShape.of(tuple(spec.example_inputs), dict(spec.dims))


def _point(gm: fx.GraphModule, text: str | None) -> dict[str, int]:
    """Where to evaluate costs: --at, else batch dims at 1 and the rest at their example size.

    A dim the model fixed to one value is left out unless given explicitly (then the cost model checks it).
    """
    values = _shape(gm).parse_at(text)
    given = {item.partition("=")[0].strip() for item in (text or "").split(",") if item.strip()}
    return {name: value for name, value in values.items() if name in graph_info(gm).symbolic or name in given}


def _traced(ref: str, shape_text: str, seed: int = 0, *, allow_path: bool = True) -> fx.GraphModule:
    model = load_model(ref, seed=seed, allow_path=allow_path)
    shape = parse_input_shape(shape_text, default_size=default_example_size(ref), seed=seed)
    return trace(model, shape.inputs, shape.dims)


_TOTALS = (("flops", "FLOPs (2 x MACs)"), ("other_ops", "other ops"), ("params", "params"),
           ("param_bytes", "param bytes"), ("bytes_read", "bytes read"), ("bytes_written", "bytes written"))


def _cost_document(ref: str, gm: fx.GraphModule, cost: GraphCost, point: dict[str, int]) -> dict[str, Any]:
    at = cost.at(**point)
    summary, values = cost.summary(), at.summary()
    mode = "training step (forward + backward, train mode)" if cost.training else "forward (eval mode)"
    return {
        "model": ref, "input_shape": _shape(gm).text, "mode": mode,
        "captured_with": graph_info(gm).method, "symbolic_dims": list(cost.symbols),
        "specialised": dict(cost.specialised), "notes": list(graph_info(gm).notes),
        "symbolic": {**{key: str(summary[key]) for key, _ in _TOTALS},
                     "macs_by_dtype": {k: str(v) for k, v in cost.macs_by_dtype.items()}},
        "readable": {**{key: formula(summary[key]) for key, _ in _TOTALS},
                     "macs_by_dtype": {k: formula(v) for k, v in cost.macs_by_dtype.items()}},
        "at": point,
        "values": {**{key: _value(values[key]) for key, _ in _TOTALS},
                   "macs_by_dtype": {k: _value(v) for k, v in at.macs_by_dtype.items()}},
    }


def _cost_lines(document: dict[str, Any]) -> list[str]:
    dims = ", ".join(document["symbolic_dims"]) or "none"
    label = max(len(text) for _, text in _TOTALS) + 1
    lines = [f"{document['model']} on input {document['input_shape']}: {document['mode']}, "
             f"captured with {document['captured_with']}", "", f"symbolic totals (in {dims})"]
    for key, text in _TOTALS[:1]:
        lines.append(f"  {text + ':':<{label}} {document['readable'][key]}")
    for dtype, readable in document["readable"]["macs_by_dtype"].items():
        lines.append(f"  {'MACs ' + dtype + ':':<{label}} {readable}")
    for key, text in _TOTALS[1:]:
        lines.append(f"  {text + ':':<{label}} {document['readable'][key]}")
    point = ", ".join(f"{k}={v}" for k, v in document["at"].items()) or "the example size"
    lines += ["", f"at {point}"]
    for key, text in _TOTALS[:1]:
        lines.append(f"  {text + ':':<{label}} {_number(document['values'][key])}")
    for dtype, value in document["values"]["macs_by_dtype"].items():
        lines.append(f"  {'MACs ' + dtype + ':':<{label}} {_number(value)}")
    for key, text in _TOTALS[1:]:
        lines.append(f"  {text + ':':<{label}} {_number(document['values'][key])}")
    specialised = document["specialised"]
    lines += ["", "specialised dims: " + ("; ".join(f"{k} ({v})" for k, v in specialised.items()) or "none")]
    lines += [f"note: {note}" for note in document.get("notes", ())]
    return lines


def cmd_passes(args: argparse.Namespace) -> int:
    documents = [cls.describe() for _, cls in sorted(REGISTRY.items())]
    if args.format == "json":
        print(json.dumps(documents, indent=2, default=repr))
        return 0
    for document in documents:
        print(f"{document['name']}: {document['summary']}")
        print(f"  contract: {document['contract']}")
        properties = "; ".join(f"{key}: {', '.join(document[key])}" for key in ("needs", "invalidates")
                               if document[key])
        print(f"  exports with torch.export: {'yes' if document['exports'] else 'no'}"
              + (f"; {properties}" if properties else ""))
        if not document["options"]:
            print("  options: none")
        for item in document["options"]:
            bounds = f" [{item['range']}]" if item["range"] else ""
            print(f"  option {item['name']}={item['default']!r}{bounds}: {item['help']}")
    return 0


def cmd_cost(args: argparse.Namespace) -> int:
    gm = _traced(args.model, args.input_shape)
    cost = graph_cost(gm, training=args.training)
    point = _point(gm, args.at)
    document = _cost_document(args.model, gm, cost, point)
    lines = _cost_lines(document)
    if args.latency:
        latency = cost.latency(args.profile, **{**_example_dims(gm), **point})
        document["latency"] = {"seconds": latency.seconds, "method": latency.method, "dims": dict(latency.dims),
                               "nodes": {node.name: {"seconds": node.seconds, "kind": node.kind}
                                         for node in latency.nodes}}
        lines += [""] + latency.lines()
    print(json.dumps(document, indent=2) if args.format == "json" else "\n".join(lines))
    return 0


def _example_dims(gm: fx.GraphModule) -> dict[str, int]:
    spec = graph_info(gm).spec
    return {name: spec.hint(name) for name in spec.dims}


def cmd_calibrate(args: argparse.Namespace) -> int:
    path = args.output or default_profile_path()
    profile = calibrate(path, quick=args.quick)
    machine = profile.machine
    print(f"wrote {path}: {machine.cpu} ({machine.isa}), {machine.threads} thread(s), torch {machine.torch}")
    return 0


def _save_format(path: str, format: str | None, pipeline: str, seed: int) -> str:
    """The save route for ``path``, checked before any work: "export" (.pt2) needs exporting passes."""
    format = format or ("export" if path.endswith(_EXPORT_SUFFIXES) else "pt")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UsageError(f"cannot write {path!r}: directory {directory!r} does not exist", where="-o",
                         fix="create the directory first or choose another path")
    steps = Pipeline(pipeline, seed=seed)
    if format == "export" and not steps.exports:
        blocking = ", ".join(p.name for p in steps.passes if not p.exports)
        raise UnsupportedError(f"passes {blocking} produce graphs torch.export cannot export", where=f"-o {path}",
                               fix="save as an fxreduce .pt file instead")
    return format


def _certificates(report: RewriteReport) -> list[str]:
    """FLOPs count only matrix products; folding-style rewrites save the other arithmetic, so certify both."""
    return [f"certificate (FLOPs): {report.certificate}",
            f"certificate (other ops): {certify(report.before, report.after, metric='other')}"]


def _with_calibration(spec: str, path: str | None) -> str:
    """The spec with ``calibration=path`` given to every pass that takes calibration data and has none."""
    if path is None:
        return spec
    if not os.path.isfile(path):
        raise InputError(f"calibration file {path!r} does not exist", where="--calibration",
                         fix="save a batch of inputs with torch.save(tensor, path)")
    parsed, used = [], False
    for name, options in parse_spec(spec):
        fields = {option["name"] for option in get_pass(name).describe()["options"]}
        if "calibration" in fields and options.get("calibration") is None:
            options, used = {**options, "calibration": path}, True
        parsed.append(name + ("(" + ", ".join(f"{k}={v!r}" for k, v in options.items()) + ")" if options else ""))
    if not used:
        raise InputError("--calibration was given but no pass of the pipeline takes calibration data",
                         where=f"--pipeline {spec}", fix="drop --calibration, or add a pass such as lower_int8")
    return ",".join(parsed)


def _apply_to_submodules(args: argparse.Namespace) -> int:
    """apply --submodules: capture and rewrite the named parts in place; the rest of the model stays Python."""
    if args.output:
        raise UnsupportedError("a partly rewritten model cannot be saved by fxreduce (its Python parts have no "
                               "graph to save)", where=f"-o {args.output} with --submodules",
                               fix="drop -o, or use fxreduce.apply(..., submodules=[...]) in Python and save "
                                   "each rewritten part's graph_module")
    model = load_model(args.model, seed=args.seed)
    shape = parse_input_shape(args.input_shape, default_size=default_example_size(args.model), seed=args.seed)
    names = [name.strip() for name in args.submodules.split(",") if name.strip()]
    result = apply_to_submodules(model, Pipeline(args.pipeline, seed=args.seed), names, shape.inputs)
    print("\n".join(result.report.lines() + [f"certificate (FLOPs, rewritten parts): {result.report.certificate}"]))
    if args.measure:
        print("\n".join(measure(model, result.model, shape.inputs).lines()))
    return 0


def cmd_apply(args: argparse.Namespace) -> int:
    args.pipeline = _with_calibration(args.pipeline, args.calibration)
    if args.submodules:
        return _apply_to_submodules(args)
    format = _save_format(args.output, args.format, args.pipeline, args.seed) if args.output else None
    built = build(args.model, args.input_shape, args.pipeline, args.seed)
    report = built.result.report
    report.at, report.profile = _point(built.original, args.at), args.profile
    print("\n".join(report.lines() + _certificates(report)))
    if args.measure:
        print("\n".join(measure(built.original, built.graph_module, built.shape.inputs).lines()))
    if format == "export":
        export(args.output, built.graph_module,
               manifest=Manifest(args.model, Pipeline(args.pipeline, seed=args.seed).spec, built.shape.text, args.seed))
        print(f"wrote {args.output} (torch.export program; `fxreduce inspect {args.output} --trust` shows it)")
    elif format == "pt":
        save(args.output, built.graph_module, model_ref=args.model, pipeline_spec=args.pipeline,
             input_spec_text=built.shape.text, seed=args.seed)
        print(f"wrote {args.output} (fxreduce save: manifest + weights; `fxreduce inspect {args.output}` rebuilds it)")
    return 0


def _load_file(path: str, trust: bool) -> Loaded:
    return load_export(path, trusted=trust) if path.endswith(_EXPORT_SUFFIXES) else load(path)


def _original(loaded: Loaded) -> fx.GraphModule:
    """The graph a loaded file was rewritten from, rebuilt from its manifest (never from a file path it names)."""
    if loaded.built is not None:
        return loaded.built.original
    if loaded.manifest is None:
        raise UsageError("this file names no original model to diff against", where="--diff",
                         fix="name it: --diff MODEL")
    manifest = loaded.manifest
    return _traced(manifest.model, manifest.input_shape, manifest.seed, allow_path=False)


def cmd_inspect(args: argparse.Namespace) -> int:
    loaded = None
    if args.target.endswith(_EXPORT_SUFFIXES + _SAVE_SUFFIXES):
        loaded = _load_file(args.target, args.trust)
        graph = loaded.graph_module
    elif args.diff == _SAVED:
        raise UsageError("--diff without a MODEL needs a saved file to inspect", where="--diff",
                         fix="name the model to compare with: --diff MODEL")
    else:
        graph = _traced(args.target, args.input_shape or DEFAULT_SHAPE)
    if args.diff == _SAVED:
        before = _original(loaded)
    elif args.diff:
        before = _traced(args.diff, args.input_shape or _shape(graph).text)
    else:
        before = None
    report = loaded.built.result.report if loaded is not None and loaded.built is not None else None
    inspection = inspect(graph if before is None else before, None if before is None else graph,
                         at=_point(graph, args.at), format=args.format or "table",
                         report=report if args.diff == _SAVED else None)
    if args.output:
        print(f"wrote {inspection.write(args.output, args.format)}")
    else:
        print(inspection.render(), end="" if args.format in ("dot", "svg", "html") else "\n")
    return 0


def _verify_lines(gm: fx.GraphModule, pipeline: str, seed: int, trials: int) -> tuple[bool, list[str]]:
    result = check_contract(Pipeline(pipeline, seed=seed), gm, trials=trials, seed=seed)
    broken = sum(not check.ok for check in result.checks)
    verdict = "every contract holds" if result.ok else f"{broken} contract(s) BROKEN"
    return result.ok, result.lines() + [verdict]


def cmd_verify(args: argparse.Namespace) -> int:
    gm = _traced(args.model, args.input_shape, args.seed)
    ok, lines = _verify_lines(gm, args.pipeline, args.seed, args.trials)
    print("\n".join(lines))
    return 0 if ok else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from . import demo

    started = time.perf_counter()
    settings = demo.Settings.fast() if args.fast else demo.Settings()
    settings = dataclasses.replace(settings, threads=args.threads or settings.threads, seed=args.seed)
    print(f"fxreduce demo: each technique on a small real model -- the cost model's proven cut, the speedup "
          f"measured side by side ({settings.threads} torch threads), the contract checked on fresh inputs\n")
    sections = demo.run(args.technique, settings)
    print("== summary")
    print("\n".join(demo.summary(sections, settings.threads)))
    if args.out_dir:
        os.makedirs(args.out_dir, exist_ok=True)
        for section in sections:
            page = inspect(section.original, section.rewritten, report=section.report)
            print(f"wrote {page.write(os.path.join(args.out_dir, section.technique + '.html'))} (interactive diff)")
    print(f"done in {time.perf_counter() - started:.1f} s")
    return 0 if all(section.contract_ok for section in sections) else 1


def _model_options(parser: argparse.ArgumentParser, shape_default: str | None = DEFAULT_SHAPE,
                   shape_help: str = "default: %(default)s", at: bool = True) -> None:
    parser.add_argument("--input-shape", default=shape_default, metavar="SHAPE",
                        help="example input shape: names are symbolic dims, integers fixed, NAME=SIZE sets an "
                             f"example size, ';' separates inputs, ':long' sets a dtype ({shape_help})")
    if at:
        parser.add_argument("--at", metavar="DIMS", help="evaluate costs at NAME=VALUE,... "
                                                         "(default: axis-0 dims at 1, others at their example size)")


def cmd_doctor(args: argparse.Namespace) -> int:
    """Which kernels this installation runs: fxreduce's native layer (and its ISA) or the torch fallback."""
    from . import native

    print(f"fxreduce {__version__}, torch {torch.__version__}")
    print("\n".join(native.report()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="fxreduce", description="Computation-reducing compiler passes on torch.fx. "
                     "MODEL is default (the demo CNN), torchvision:NAME, package.module:factory or file.py:factory.")
    parser.add_argument("--threads", type=_positive, metavar="N", help="torch CPU threads (torch.set_num_threads)")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE_OR_FILE",
                        help="import your own passes first (a module name or a .py file; repeatable): "
                             "importing the file registers its passes")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    passes = commands.add_parser("passes", help="list every registered pass with its contract and options")
    passes.add_argument("--format", choices=("table", "json"), default="table")
    passes.set_defaults(run=cmd_passes)

    doctor = commands.add_parser("doctor", help="which kernels run here: native (and on which ISA) or torch fallback")
    doctor.set_defaults(run=cmd_doctor)

    cost = commands.add_parser("cost", help="symbolic FLOPs, MACs, params and bytes of a model")
    cost.add_argument("model", metavar="MODEL")
    _model_options(cost)
    cost.add_argument("--training", action="store_true", help="count a training step (forward + backward)")
    cost.add_argument("--format", choices=("table", "json"), default="table")
    cost.add_argument("--latency", action="store_true",
                      help="also predict the latency at --at on this machine (the training step with --training; "
                           "needs `fxreduce calibrate`)")
    cost.add_argument("--profile", metavar="FILE", help="latency profile to use (default: the one calibrate wrote)")
    cost.set_defaults(run=cmd_cost)

    calib = commands.add_parser("calibrate", help="measure this machine's kernels for the latency model (~1 min)")
    calib.add_argument("-o", "--output", metavar="FILE", help="where to write the profile "
                                                             "(default: the user's cache directory)")
    calib.add_argument("--quick", action="store_true", help="a tiny grid (seconds; for tests, not predictions)")
    calib.set_defaults(run=cmd_calibrate)

    apply = commands.add_parser("apply", help="rewrite a model with a pipeline, report it, optionally save it")
    apply.add_argument("model", metavar="MODEL")
    apply.add_argument("--pipeline", required=True, metavar="SPEC", help="e.g. 'fold_batchnorm,remove_dropout'")
    _model_options(apply)
    apply.add_argument("-o", "--output", metavar="PATH", help="save the rewrite: .pt (fxreduce save) or .pt2 "
                                                               "(torch.export program)")
    apply.add_argument("--format", choices=("pt", "export"), help="save format (default: from the suffix)")
    apply.add_argument("--seed", type=int, default=0, help="seed of model init, example inputs and passes")
    apply.add_argument("--calibration", metavar="FILE", help="inputs saved with torch.save for passes that "
                                                            "calibrate (lower_int8); without it they use random inputs")
    apply.add_argument("--profile", metavar="FILE", help="latency profile for the predicted speedups (default: the "
                                                         "one `fxreduce calibrate` wrote)")
    apply.add_argument("--submodules", metavar="NAMES", help="capture and rewrite only these submodules, in place "
                       "(comma-separated module paths, e.g. backbone,roi_heads.box_head), for models that cannot "
                       "be captured whole; the rest stays Python and the report covers the rewritten parts")
    apply.add_argument("--no-measure", dest="measure", action="store_false",
                       help="skip running both models on the example input (output error and eval latency)")
    apply.set_defaults(run=cmd_apply)

    insp = commands.add_parser("inspect", help="node table, or before/after diff, of a saved file or a model")
    insp.add_argument("target", metavar="FILE_OR_MODEL", help="a .pt / .pt2 written by apply, or a MODEL")
    insp.add_argument("--diff", nargs="?", const=_SAVED, metavar="MODEL",
                      help="diff against MODEL (the 'before'); alone, against the saved file's original model "
                           "(write it after FILE_OR_MODEL)")
    _model_options(insp, shape_default=None, shape_help=f"default: {DEFAULT_SHAPE} for a MODEL, a file's own")
    insp.add_argument("--format", choices=("table", "json", "dot", "svg", "html"),
                      help="output format (default: table, or from the -o suffix)")
    insp.add_argument("-o", "--output", metavar="PATH", help="write to PATH instead of stdout")
    insp.add_argument("--trust", action="store_true",
                      help="allow loading a .pt2 (torch.export.load may run code stored in the file)")
    insp.set_defaults(run=cmd_inspect)

    verify = commands.add_parser("verify", help="check each pass's contract on a model")
    verify.add_argument("model", metavar="MODEL")
    verify.add_argument("--pipeline", required=True, metavar="SPEC")
    _model_options(verify, at=False)
    verify.add_argument("--trials", type=_positive, default=3, help="random inputs of other sizes per pass")
    verify.add_argument("--seed", type=int, default=0)
    verify.set_defaults(run=cmd_verify)

    demo = commands.add_parser("demo", help="every technique cutting computation on a small model: proven cut, "
                                            "measured speedup, contract")
    demo.add_argument("--technique", action="append", choices=TECHNIQUES, metavar="NAME",
                      help=f"run only this section (repeatable): {', '.join(TECHNIQUES)}")
    demo.add_argument("--out-dir", metavar="DIR", help="also write each rewrite's HTML diff page here")
    demo.add_argument("--fast", action="store_true", help="tiny workloads and few repeats (a smoke run)")
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(run=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status (0 ok, 1 a contract broke, 2 a user error)."""
    try:
        args = build_parser().parse_args(argv)
        if args.threads:
            torch.set_num_threads(args.threads)
        for location in args.imports:
            import_code(location, where="--import")
        return args.run(args)
    except FxReduceError as error:
        print(f"fxreduce: error: {_one_line(error)}", file=sys.stderr)
        return 2
    except SystemExit as exit:
        return exit.code if isinstance(exit.code, int) else 0
