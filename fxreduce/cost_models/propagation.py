"""One symbolic fake-tensor run of a GraphModule: output shapes and counts for every node.

Inputs become fake tensors whose named dims are symbols of a ShapeEnv (duck sizing off, so equal
example sizes stay distinct symbols; 0/1 not specialised). Parameters stay static. The run records each
node's output shape as sympy expressions and what it computes (counting.OpCounter); nothing real is
computed and nothing of the model changes. Dims the model fixes (a guard pins them to a value) or
that symbolic propagation cannot handle fall back to their example value, and the result says which.
"""

from __future__ import annotations

import contextlib
import operator
import signal
import threading
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping

import sympy
import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import (
    DimDynamic,
    ShapeEnv,
    StatelessSymbolicContext,
)
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils._sympy import functions as torch_sympy

from .. import meta
from ..errors import CostError, InputError, TraceError
from ..text import error_summary
from .counting import (
    NodeCounts,
    OpCounter,
    SymbolicDecompositions,
    dtype_name,
    to_sympy,
)
from .symbolic import ZERO, GraphCost, NodeCost


@dataclass(frozen=True)
class InputSpec:
    """What a graph runs on: example inputs (real tensors) and the named dims, name -> (input, axis).

    ``tied`` lists further axes that always equal a named dim (an attention mask's (N, T) beside
    input_ids'): name -> ((input, axis), ...); they take the dim's symbol and its sizes. ``names`` are
    the inputs' keyword names where the model was captured from keyword inputs.
    """

    example_inputs: tuple
    dims: Mapping[str, tuple[int, int]] = field(default_factory=dict)
    tied: Mapping[str, tuple[tuple[int, int], ...]] = field(default_factory=dict)
    names: tuple[str, ...] = ()

    def _check_position(self, name: str, position: Any) -> tuple[int, int]:
        if not (isinstance(position, tuple) and len(position) == 2):
            raise InputError(f"dim {name!r} must map to (input index, axis), got {position!r}",
                             where="dynamic", fix='e.g. dynamic={"N": (0, 0), "H": (0, 2)}')
        index, axis = position
        if not 0 <= index < len(self.example_inputs) or not isinstance(self.example_inputs[index], torch.Tensor):
            raise InputError(f"dim {name!r} refers to input {index}, which is not a tensor input",
                             where="dynamic", fix=f"there are {len(self.example_inputs)} example inputs")
        tensor = self.example_inputs[index]
        if not -tensor.dim() <= axis < tensor.dim():
            raise InputError(f"dim {name!r} refers to axis {axis} of input {index}, which has shape "
                             f"{tuple(tensor.shape)}", where="dynamic", fix="name an existing axis")
        return index, axis % tensor.dim()

    def validate(self) -> None:
        seen: dict[tuple[int, int], str] = {}
        for name, position in self.dims.items():
            key = self._check_position(name, position)
            if key in seen:
                raise InputError(f"dims {seen[key]!r} and {name!r} name the same axis", where="dynamic")
            seen[key] = name
        for name, positions in self.tied.items():
            if name not in self.dims:
                raise InputError(f"tied axes name the dim {name!r}, which is not a named dim", where="dynamic",
                                 fix=f"the named dims are: {', '.join(self.dims) or 'none'}")
            for position in positions:
                key = self._check_position(name, position)
                if key in seen:
                    raise InputError(f"dims {seen[key]!r} and {name!r} name the same axis", where="dynamic")
                seen[key] = name
                size = int(self.example_inputs[key[0]].shape[key[1]])
                if size != self.hint(name):
                    raise InputError(f"dim {name!r} is {self.hint(name)} long on input {self.dims[name][0]} but "
                                     f"{size} on input {key[0]}, axis {key[1]}", where="dynamic",
                                     fix="give the inputs that share a dim the same example size")

    def positions(self, name: str) -> tuple[tuple[int, int], ...]:
        """Every (input, axis) that takes the dim ``name``: the named axis, then its tied axes; normalised."""
        every = (self.dims[name],) + tuple(self.tied.get(name, ()))
        return tuple((index, axis % self.example_inputs[index].dim()) for index, axis in every)

    def hint(self, name: str) -> int:
        index, axis = self.dims[name]
        return int(self.example_inputs[index].shape[axis])

    def resized(self, sizes: Mapping[str, int], make: Any) -> tuple:
        """The inputs with each named dim (and its tied axes) at ``sizes[name]``; ``make(value, shape)``
        builds each tensor input of a new shape."""
        by_axis = {position: size for name, size in sizes.items() for position in self.positions(name)}
        fresh = []
        for index, value in enumerate(self.example_inputs):
            if not isinstance(value, torch.Tensor):
                fresh.append(value)
                continue
            fresh.append(make(value, [by_axis.get((index, axis), size) for axis, size in enumerate(value.shape)]))
        return tuple(fresh)


@dataclass(frozen=True)
class NodeInfo:
    """Stored in node.meta (``meta.info(node)``): the node's output shape(s), dtype(s) and forward cost."""

    shape: Any
    dtype: Any
    cost: NodeCost


@dataclass(frozen=True)
class GraphInfo:
    """Stored in graph_module.meta (``meta.info(gm)``): how the graph was captured and what it runs on.

    ``notes`` say what capture changed or left out (e.g. a transformers cache dropped from the outputs).
    """

    spec: InputSpec
    method: str
    symbolic: tuple[str, ...]
    specialised: Mapping[str, str]
    fixed: Mapping[str, sympy.Expr]
    constraints: Mapping[str, tuple[int, int | None]]
    source: str = ""
    time_limit: float | None = 60.0
    notes: tuple[str, ...] = ()


def symbol(name: str) -> sympy.Symbol:
    """The sympy symbol of a user dim: a positive integer."""
    return sympy.Symbol(name, integer=True, positive=True)


_FLOOR_LIKE = (torch_sympy.FloorDiv, torch_sympy.CleanDiv)


def standardise(expr: sympy.Expr) -> sympy.Expr:
    """Replace torch's internal sympy functions by plain sympy ones users can read and evaluate."""
    if not isinstance(expr, sympy.Basic) or expr.is_Number:
        return expr
    if expr.has(*_FLOOR_LIKE):
        expr = expr.replace(lambda e: isinstance(e, _FLOOR_LIKE), lambda e: sympy.floor(e.args[0] / e.args[1]))
    if expr.has(torch_sympy.PythonMod):
        expr = expr.replace(lambda e: isinstance(e, torch_sympy.PythonMod), lambda e: sympy.Mod(*e.args))
    if expr.has(torch_sympy.CeilToInt):
        expr = expr.replace(lambda e: isinstance(e, torch_sympy.CeilToInt), lambda e: sympy.ceiling(e.args[0]))
    if expr.has(torch_sympy.FloorToInt):
        expr = expr.replace(lambda e: isinstance(e, torch_sympy.FloorToInt), lambda e: sympy.floor(e.args[0]))
    return expr


class _Timeout(Exception):
    pass


_deadline = {"passed": False}
# CPU seconds one node may run past the time limit before it is interrupted where it stands.
_OVERRUN_GRACE = 5.0


def _check_deadline() -> None:
    """Between nodes: stop the run once its time limit has passed (see :func:`_time_limit`)."""
    if _deadline["passed"]:
        raise _Timeout()


@contextlib.contextmanager
def _time_limit(seconds: float | None) -> Iterator[None]:
    """Stop the run after ``seconds`` of this process's CPU time (main thread only; elsewhere no limit).

    CPU time, not wall time, so a busy machine does not turn a symbolic dim concrete. When the time is up,
    the run stops at its next node (:func:`_check_deadline`), where nothing is half-done. Only a node that
    runs on for another _OVERRUN_GRACE CPU s is interrupted where it stands, by an exception
    from the signal handler: that can land anywhere (in a half-done import, in a C++ callback that cannot
    pass it on); raised there on the first signal, it once aborted the whole test process.
    """
    if not seconds or threading.current_thread() is not threading.main_thread():
        yield
        return

    def on_alarm(signum, frame):
        if not _deadline["passed"]:
            _deadline["passed"] = True
            return
        raise _Timeout()

    _deadline["passed"] = False
    previous = signal.signal(signal.SIGPROF, on_alarm)
    # Re-fire until disarmed: an exception raised where Python ignores it (a finalizer) is not lost.
    signal.setitimer(signal.ITIMER_PROF, seconds, _OVERRUN_GRACE)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_PROF, 0)
        signal.signal(signal.SIGPROF, previous)
        _deadline["passed"] = False


@dataclass
class _Run:
    raw_meta: dict[str, tuple[Any, Any]]
    counts: dict[str | None, NodeCounts]
    to_user: dict[sympy.Symbol, sympy.Expr]
    symbolic: tuple[str, ...]
    specialised: dict[str, str]
    fixed: dict[str, sympy.Expr]
    constraints: dict[str, tuple[int, int | None]]
    declared_inputs: dict[str, list[Any]]
    shape_env: ShapeEnv


def _shape_of(value: Any) -> tuple[Any, Any]:
    """(shape, dtype) of a fake value as raw sympy, recursing into tuples/lists."""
    if isinstance(value, torch.Tensor):
        return tuple(to_sympy(s) for s in value.shape), value.dtype
    if isinstance(value, (tuple, list)):
        pairs = [_shape_of(v) for v in value]
        return tuple(p[0] for p in pairs), tuple(p[1] for p in pairs)
    if isinstance(value, (torch.SymInt, int)) and not isinstance(value, bool):
        return to_sympy(value), "int"
    return None, type(value).__name__


def _hinted_inputs(spec: InputSpec, wanted: Mapping[tuple[int, int], Any]) -> list[Any]:
    """Example inputs whose symbolic axes are at least 2 long: torch's ShapeEnv specialises 0 and 1,
    and a fake run needs shapes, not values."""
    inputs = []
    for index, value in enumerate(spec.example_inputs):
        if isinstance(value, torch.Tensor):
            hinted = [max(size, 2) if (index, axis) in wanted else size for axis, size in enumerate(value.shape)]
            if hinted != list(value.shape):
                value = value.new_zeros(hinted)
        inputs.append(value)
    return inputs


def _normal(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().clone() if tensor.is_inference() else tensor


def _fake_run(gm: fx.GraphModule, spec: InputSpec, dynamic: tuple[str, ...], training: bool) -> _Run:
    """The run in one autograd mode whatever the caller's: under torch.no_grad or torch.inference_mode a
    training step would have no backward, and eager code (nn.MultiheadAttention) picks other kernels."""
    with torch.inference_mode(False), torch.enable_grad():
        return _grad_mode_fake_run(gm, spec, dynamic, training)


def _grad_mode_fake_run(gm: fx.GraphModule, spec: InputSpec, dynamic: tuple[str, ...], training: bool) -> _Run:
    shape_env = ShapeEnv(duck_shape=False, specialize_zero_one=False)
    mode = FakeTensorMode(shape_env=shape_env, allow_non_fake_inputs=True)
    fakes, raw_symbol = _fake_inputs(mode, spec, dynamic)
    with mode:
        # Parameters keep requires_grad even for a forward count: eager code such as
        # nn.MultiheadAttention picks another kernel when no input requires grad.
        state = {name: mode.from_tensor(_normal(p), static_shapes=True).requires_grad_(p.requires_grad)
                 for name, p in gm.named_parameters()}
        state.update({name: mode.from_tensor(_normal(b), static_shapes=True) for name, b in gm.named_buffers()})
    counter, raw_meta, declared_inputs = _record(gm, mode, state, fakes, training)
    to_user, symbolic, specialised, fixed, constraints = _resolve_dims(shape_env, raw_symbol)
    return _Run(raw_meta, counter.counts, to_user, tuple(symbolic), specialised, fixed, constraints,
                declared_inputs, shape_env)


def _fake_inputs(mode: FakeTensorMode, spec: InputSpec, dynamic: tuple[str, ...]) -> tuple[list, dict[str, Any]]:
    """Fake example inputs with each named axis a fresh symbol (tied axes share their dim's), and each
    dim's raw ShapeEnv symbol."""
    wanted = {spec.positions(name)[0]: name for name in dynamic}
    tied = {position: name for name in dynamic for position in spec.positions(name)[1:]}
    raw_symbol: dict[str, sympy.Expr] = {}
    sizes: dict[str, torch.SymInt] = {}
    fakes = []
    # Tensors made under torch.inference_mode cannot take part in autograd: normal copies of them.
    inputs = [v.clone() if isinstance(v, torch.Tensor) and v.is_inference() else v
              for v in _hinted_inputs(spec, {**wanted, **tied})]
    with mode:
        for index, value in enumerate(inputs):
            if not isinstance(value, torch.Tensor):
                fakes.append(value)
                continue
            axes = [DimDynamic.DYNAMIC if (index, axis) in wanted else DimDynamic.STATIC for axis in range(value.dim())]
            fake = mode.from_tensor(value, symbolic_context=StatelessSymbolicContext(dynamic_sizes=axes))
            fakes.append(fake)
            for axis in range(value.dim()):
                if (index, axis) in wanted:
                    sizes[wanted[(index, axis)]] = fake.shape[axis]
                    raw_symbol[wanted[(index, axis)]] = to_sympy(fake.shape[axis])
        # Tied axes take their dim's very symbol: a fresh tensor of that symbolic shape (fake: no values).
        for index, value in enumerate(inputs):
            if any((index, axis) in tied for axis in range(getattr(value, "ndim", 0))):
                shape = [sizes[tied[(index, axis)]] if (index, axis) in tied else size
                         for axis, size in enumerate(fakes[index].shape)]
                fakes[index] = torch.empty(shape, dtype=value.dtype, device=value.device)
    return fakes, raw_symbol


def _record(gm: fx.GraphModule, mode: FakeTensorMode, state: dict[str, torch.Tensor], fakes: list,
            training: bool) -> tuple[OpCounter, dict[str, tuple[Any, Any]], dict[str, list[Any]]]:
    """Run ``gm`` on fake inputs and parameters, counting every op per node (and the backward's, for a
    training step); returns the counter, each node's raw (shape, dtype) and the inputs of modules that
    declare their own cost."""
    counter = OpCounter()
    raw_meta: dict[str, tuple[Any, Any]] = {}
    declared_inputs: dict[str, list[Any]] = {}

    class Recorder(LocatingInterpreter):
        passthrough = (_Timeout,)

        def run_node(self, node: fx.Node) -> Any:
            _check_deadline()
            counter.current = node.name
            out = super().run_node(node)
            raw_meta[node.name] = _shape_of(out)
            if node.op == "call_module" and hasattr(self.module.get_submodule(node.target), "fxreduce_macs"):
                declared_inputs[node.name] = [raw_meta[a.name][0] for a in node.all_input_nodes]
            if training:
                counter.claim_autograd_nodes(out)
            return out

    was_training = gm.training
    if training:
        meta.set_mode(gm, True)
    try:
        with mode, counter, SymbolicDecompositions(), _reparametrize_module(gm, state):
            output = Recorder(gm).run(*fakes)
            if training:
                leaves = [t for t in state.values() if t.requires_grad]
                outputs = [t for t in torch.utils._pytree.tree_leaves(output)
                           if isinstance(t, torch.Tensor) and t.requires_grad]
                if leaves and outputs:
                    counter.current = None
                    loss = sum(o.float().sum() for o in outputs)
                    try:
                        torch.autograd.grad(loss, leaves, allow_unused=True)
                    except RuntimeError as error:
                        raise CostError(f"a training step of this graph cannot run its backward: "
                                        f"{error_summary(error)}", where="fxreduce.cost(graph, training=True)",
                                        fix="inference-only kernels (lower_int8's) have no gradient: take the "
                                            "training cost of the graph before them, or the eval cost") from error
    finally:
        meta.set_mode(gm, was_training)
    return counter, raw_meta, declared_inputs


def _resolve_dims(shape_env: ShapeEnv, raw_symbol: dict[str, Any]):
    """What the run learned of each named dim: still symbolic, pinned to a number, tied to another dim;
    and the bounds the ShapeEnv found. Returns (raw symbol -> user expression, symbolic names,
    specialised reasons, fixed values, constraints)."""
    to_user: dict[sympy.Symbol, sympy.Expr] = {}
    symbolic, specialised, fixed, constraints = [], {}, {}, {}
    for name, raw in raw_symbol.items():
        resolved = shape_env.replace(raw) if isinstance(raw, sympy.Symbol) else raw
        if resolved.is_Number:
            specialised[name] = f"fixed by the model to {int(resolved)} (a size check or a loop over it)"
            fixed[name] = to_user[raw] = resolved
            continue
        symbolic.append(name)
        to_user[raw] = symbol(name)
    for name, raw in raw_symbol.items():
        if name in symbolic and isinstance(raw, sympy.Symbol):
            resolved = shape_env.replace(raw)
            if resolved != raw:
                fixed[name] = to_user[raw] = resolved.xreplace(to_user)
                specialised[name] = f"equal to {to_user[raw]} (the model ties them)"
            value_range = shape_env.var_to_range.get(raw)
            if value_range is not None:
                lower = int(value_range.lower) if isinstance(value_range.lower, sympy.Integer) else 1
                upper = int(value_range.upper) if isinstance(value_range.upper, sympy.Integer) else None
                constraints[name] = (max(lower, 1), upper)
    symbolic = [n for n in symbolic if n not in specialised]
    return to_user, symbolic, specialised, fixed, constraints


class NodeFailure(Exception):
    """An error raised while running one node of a graph, and the node."""

    def __init__(self, node: fx.Node, error: Exception):
        super().__init__(str(error))
        self.node, self.error = node, error


class LocatingInterpreter(fx.Interpreter):
    """An fx Interpreter whose errors name the node that raised them (as :class:`NodeFailure`)."""

    passthrough: tuple[type[BaseException], ...] = ()

    def run_node(self, node: fx.Node) -> Any:
        try:
            return super().run_node(node)
        except self.passthrough:
            raise
        except Exception as error:
            raise NodeFailure(node, error) from error


def _run_with_fallback(gm: fx.GraphModule, spec: InputSpec, training: bool, time_limit: float | None,
                       dynamic: tuple[str, ...] | None = None) -> _Run:
    """Run with every named dim symbolic; where that fails, keep only the dims that work alone."""
    names = tuple(spec.dims) if dynamic is None else dynamic
    failures: dict[str, str] = {}

    def attempt(subset: tuple[str, ...]) -> _Run | None:
        try:
            with _time_limit(time_limit if subset else None):
                return _fake_run(gm, spec, subset, training)
        except _Timeout:
            failures[",".join(subset)] = f"symbolic propagation did not finish in {time_limit:g} CPU s"
        except NodeFailure as failure:
            if not subset:
                raise _example_failure(gm, spec, failure) from failure.error
            failures[",".join(subset)] = (f"symbolic propagation failed at node {failure.node.name} "
                                          f"({type(failure.error).__name__})")
        return None

    run = attempt(names)
    if run is not None:
        return run
    reason = failures[",".join(names)]
    alone = [name for name in names if len(names) > 1 and attempt((name,)) is not None]
    for subset in ([tuple(alone)] if len(alone) > 1 else []) + [(name,) for name in alone] + [()]:
        run = attempt(subset)
        if run is not None:
            for name in names:
                if name not in subset:
                    run.specialised.setdefault(name, f"concrete {spec.hint(name)}: {reason}")
                    run.fixed.setdefault(name, sympy.Integer(spec.hint(name)))
            return run
    raise AssertionError("unreachable: the all-concrete attempt either succeeds or raises")


def _example_failure(gm: fx.GraphModule, spec: InputSpec, failure: NodeFailure) -> InputError:
    node = failure.node
    shapes = ", ".join(str(tuple(t.shape)) if isinstance(t, torch.Tensor) else repr(t) for t in spec.example_inputs)
    origin = node.meta.get("stack_trace", "").strip().splitlines()
    where = f"node {node.name} ({node.op} {node.target})" + (f", {origin[-2].strip()}" if len(origin) >= 2 else "")
    return InputError(
        f"the model does not run on example inputs of shape {shapes}: "
        f"{error_summary(failure.error)}",
        where=where, fix="pass example inputs of the shape and dtype the model expects")


class _Converter:
    """Raw ShapeEnv expressions -> standard sympy in user symbols, memoised."""

    def __init__(self, run: _Run):
        self.run, self.cache = run, {}

    def __call__(self, value: Any) -> Any:
        if isinstance(value, tuple):
            return tuple(self(v) for v in value)
        if not isinstance(value, sympy.Basic) or value.is_Number:
            return value
        cached = self.cache.get(value)
        if cached is None:
            replaced = self.run.shape_env.replace(value) if value.free_symbols else value
            cached = self.cache[value] = standardise(replaced.xreplace(self.run.to_user))
        return cached

    def counts(self, values: Mapping[str, sympy.Expr]) -> dict[str, sympy.Expr]:
        return {k: self(v) for k, v in values.items()}


def _bytes(shape: Any, dtype: Any) -> sympy.Expr:
    if isinstance(dtype, torch.dtype) and isinstance(shape, tuple):
        return sympy.Mul(*shape) * dtype.itemsize
    if isinstance(dtype, tuple) and isinstance(shape, tuple):
        return sympy.Add(*(_bytes(s, d) for s, d in zip(shape, dtype)))
    return ZERO


def _node_costs(gm: fx.GraphModule, run: _Run, convert: _Converter, training: bool) -> dict[str, NodeCost]:
    """Assemble NodeCost per node: counted ops, declared module costs, params and bytes."""
    costs: dict[str, NodeCost] = {}
    param_owner: dict[str, str] = {}
    parameters = dict(gm.named_parameters())
    for node in gm.graph.nodes:
        if node.op == "get_attr" and node.target in parameters:
            users = [u for u in node.users]
            owner = users[0].name if users else node.name
            param_owner.setdefault(node.target, owner)
    attr_params: dict[str, int] = {}
    for target, owner in param_owner.items():
        attr_params[owner] = attr_params.get(owner, 0) + parameters[target].numel()
    attr_bytes: dict[str, int] = {}
    for target, owner in param_owner.items():
        attr_bytes[owner] = attr_bytes.get(owner, 0) + parameters[target].numel() * parameters[target].element_size()

    for node in gm.graph.nodes:
        counts = run.counts.get(node.name, NodeCounts())
        shape, dtype = run.raw_meta.get(node.name, (None, None))
        params, param_bytes = attr_params.get(node.name, 0), attr_bytes.get(node.name, 0)
        parts: dict[str, sympy.Expr] = {}
        macs = convert.counts(counts.macs)
        backward_macs = convert.counts(counts.backward_macs)
        declared = False
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            params += sum(p.numel() for p in module.parameters())
            param_bytes += sum(p.numel() * p.element_size() for p in module.parameters())
            param_bytes += sum(b.numel() * b.element_size() for b in module.buffers())
            if node.name in run.declared_inputs:
                declared = True
                shapes = [convert(s) for s in run.declared_inputs[node.name]]
                parts = {k: sympy.sympify(v) for k, v in module.fxreduce_macs(shapes, training=False).items()}
                mac_dtype = getattr(module, "fxreduce_mac_dtype", None) or dtype_name(_first_dtype(dtype))
                macs = {mac_dtype: sympy.Add(*parts.values())}
                if training:
                    step = module.fxreduce_macs(shapes, training=True)
                    backward_macs = {mac_dtype: sympy.expand(sympy.Add(*map(sympy.sympify, step.values()))
                                                             - macs[mac_dtype])}
        moves = node.op in ("call_module", "call_function", "call_method") and node.target is not operator.getitem
        bytes_read = ZERO
        if moves:
            bytes_read = sympy.Add(*(_bytes(convert(run.raw_meta[a.name][0]), run.raw_meta[a.name][1])
                                     for a in node.all_input_nodes if a.name in run.raw_meta))
        costs[node.name] = NodeCost(
            macs={k: v for k, v in macs.items() if v != 0},
            other=convert(counts.other),
            params=sympy.Integer(params),
            param_bytes=sympy.Integer(param_bytes),
            bytes_read=bytes_read,
            bytes_written=_bytes(convert(shape), dtype) if moves else ZERO,
            backward_macs={k: v for k, v in backward_macs.items() if v != 0},
            backward_other=convert(counts.backward_other),
            parts=parts,
            declared=declared,
        )
    backward_only = run.counts.get(None)
    if backward_only is not None and (backward_only.backward_macs or backward_only.macs):
        costs["(loss)"] = NodeCost(macs=convert.counts(backward_only.macs),
                                   backward_macs=convert.counts(backward_only.backward_macs),
                                   other=convert(backward_only.other),
                                   backward_other=convert(backward_only.backward_other))
    return costs


def _first_dtype(dtype: Any) -> torch.dtype:
    if isinstance(dtype, tuple):
        return next((_first_dtype(d) for d in dtype if _first_dtype(d) is not None), torch.float32)
    return dtype if isinstance(dtype, torch.dtype) else torch.float32


def propagate(gm: fx.GraphModule, spec: InputSpec, *, method: str = "symbolic_trace", source: str = "",
              time_limit: float | None = 60.0, notes: tuple[str, ...] | None = None) -> GraphInfo:
    """Annotate every node of ``gm`` with NodeInfo (shape, dtype, forward cost); store GraphInfo on gm.

    ``notes`` default to those of the GraphInfo ``gm`` already carries (a rewrite keeps its capture notes).
    """
    if notes is None:
        previous = meta.info(gm)
        notes = previous.notes if isinstance(previous, GraphInfo) else ()
    spec.validate()
    run = _run_with_fallback(gm, spec, training=False, time_limit=time_limit)
    convert = _Converter(run)
    costs = _node_costs(gm, run, convert, training=False)
    for node in gm.graph.nodes:
        shape, dtype = run.raw_meta.get(node.name, (None, None))
        node.meta[meta.INFO] = NodeInfo(shape=convert(shape), dtype=dtype, cost=costs[node.name])
    info = GraphInfo(spec=spec, method=method, symbolic=run.symbolic, specialised=run.specialised,
                     fixed=run.fixed, constraints=run.constraints, source=source, time_limit=time_limit,
                     notes=tuple(notes))
    gm.meta[meta.INFO] = info
    return info


def graph_info(gm: fx.GraphModule) -> GraphInfo:
    info = meta.info(gm)
    if info is None:
        raise CostError("this GraphModule carries no fxreduce shape information",
                        where=type(gm).__name__, fix="capture it with fxreduce.trace(model, example_inputs)")
    return info


def graph_cost(gm: fx.GraphModule, *, training: bool = False) -> GraphCost:
    """The cost of ``gm``: its forward (from node meta), or a training step (forward + backward)."""
    info = graph_info(gm)
    symbols = {name: symbol(name) for name in info.symbolic}
    if not training:
        nodes = {}
        for node in gm.graph.nodes:
            node_info = meta.info(node)
            if node_info is None:
                raise TraceError("a node has no cost: the graph changed after it was propagated",
                                 where=f"node {node.name}", fix="re-run fxreduce.trace or a Pipeline on it")
            nodes[node.name] = node_info.cost
        return GraphCost(nodes, symbols, dict(info.specialised), dict(info.fixed), dict(info.constraints),
                         graph_module=gm)
    run = _run_with_fallback(gm, info.spec, training=True, time_limit=info.time_limit, dynamic=info.symbolic)
    convert = _Converter(run)
    costs = _node_costs(gm, run, convert, training=True)
    return GraphCost(costs, symbols, dict(info.specialised), dict(info.fixed), dict(info.constraints),
                     training=True, graph_module=gm)
