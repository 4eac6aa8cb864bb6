"""Graph views passes share: networkx views of an fx graph, graph queries, and one view of each layer.

A pass asks for layers ("linear", "conv2d", "batchnorm", "lstm", "dropout") and gets :class:`Layer`
objects whichever form the graph holds them in: ``call_module`` (torch.fx symbolic tracing),
``call_function`` on torch.nn.functional, or aten ops (torch.export). Rewrites go through
:func:`replace_layer` and :func:`bypass`, which work the same for every form, so no pass handles two
dialects itself.

A linear layer is an affine map ``x W^T + b`` with a constant W, whatever its spelling: nn.Linear,
transformers' Conv1D (W stored (in, out)), F.linear, or addmm / mm / matmul / ``@`` whose right operand
is a constant, transposed or not. ``Layer.weight`` is always (out, in); ``Layer.parameter`` is the
tensor as the model stores it, and ``Layer.tied_with`` names other users of that tensor (GPT-2's
lm_head shares wte's weight), which a rewrite that replaces the weight would untie.
"""

from __future__ import annotations

import fnmatch
import operator
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Sequence

import networkx as nx
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch._subclasses.fake_tensor import FakeTensor

from . import meta

aten = torch.ops.aten

_MODULE_KINDS: dict[type, str] = {
    torch.nn.Linear: "linear",
    torch.nn.Conv2d: "conv2d",
    torch.nn.BatchNorm1d: "batchnorm",
    torch.nn.BatchNorm2d: "batchnorm",
    torch.nn.LSTM: "lstm",
    torch.nn.Dropout: "dropout",
    torch.nn.Dropout1d: "dropout",
    torch.nn.Dropout2d: "dropout",
}
_MATMULS = {torch.addmm: 1, torch.mm: 1, torch.matmul: 1, operator.matmul: 1,
            aten.addmm.default: 1, aten.mm.default: 1, aten.matmul.default: 1}  # value: index of the input
_FUNCTION_KINDS: dict[Any, str] = {
    **{target: "linear" for target in _MATMULS},
    F.linear: "linear", torch._C._nn.linear: "linear",
    F.conv2d: "conv2d", torch.conv2d: "conv2d",
    F.batch_norm: "batchnorm", torch.batch_norm: "batchnorm",
    F.dropout: "dropout", torch.dropout: "dropout",
    aten.linear.default: "linear",
    aten.conv2d.default: "conv2d",
    aten.batch_norm.default: "batchnorm",
    aten._native_batch_norm_legit_no_training.default: "batchnorm",
    aten.dropout.default: "dropout",
    aten.lstm.input: "lstm",
}


@dataclass
class Layer:
    """One layer of the graph, in whatever form: kind, node, constant weights, attributes.

    ``weight``/``bias`` are the tensors when they are constants of the graph (parameters), else None.
    ``attrs`` holds the layer's settings: stride/padding/dilation/groups (conv2d), eps/momentum and
    running stats (batchnorm), p (dropout), and ``training`` for the modes that depend on it.
    ``output`` is the node whose value is the layer's result (the getitem for aten batch norm).
    Linear layers: ``weight`` is (out, in) whatever the storage; ``parameter`` is the stored tensor
    (the (in, out) matrix of a Conv1D or of ``x @ W``); ``tied_with`` names other users of it.
    """

    kind: str
    node: fx.Node
    dialect: str
    name: str
    module: torch.nn.Module | None = None
    weight: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    attrs: dict[str, Any] = field(default_factory=dict)
    output: fx.Node | None = None
    input_index: int = 0
    parameter: torch.Tensor | None = None
    tied_with: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.parameter is None:
            self.parameter = self.weight

    @property
    def input(self) -> fx.Node:
        """The layer's input, read live from the graph (earlier rewrites may have rewired it)."""
        return self.node.args[self.input_index]

    def why_shared(self, keeps_weight: bool = False) -> str | None:
        """Why rewriting this layer would untie its weight from another layer's, or None.

        ``keeps_weight``: the rewrite keeps using :meth:`as_linear`'s weight (training-time rewrites),
        which stays tied where as_linear shares the stored parameter rather than copying it.
        """
        if not self.tied_with or (keeps_weight and self._shares_storage()):
            return None
        return (f"its weight is tied to {', '.join(self.tied_with)}; a rewritten copy would untie them, so it is "
                "left alone (untie the weights first, e.g. tie_word_embeddings=False, to rewrite it)")

    def _shares_storage(self) -> bool:
        return isinstance(self.module, torch.nn.Linear) or (
            self.module is None and isinstance(self.weight, torch.nn.Parameter))

    def as_linear(self) -> torch.nn.Linear:
        """This linear layer as an nn.Linear: the module itself, one sharing a Parameter stored (out, in), or
        one holding a copy of W where the model stores it (in, out) (Conv1D, ``x @ W``)."""
        if isinstance(self.module, torch.nn.Linear):
            return self.module
        linear = torch.nn.Linear(self.weight.shape[1], self.weight.shape[0], bias=self.bias is not None,
                                 device="meta", dtype=self.weight.dtype)
        shared = self._shares_storage()
        linear.weight = self.weight if shared else torch.nn.Parameter(self.weight.detach().contiguous().clone())
        if self.bias is not None:
            keep = shared and isinstance(self.bias, torch.nn.Parameter)
            linear.bias = self.bias if keep else torch.nn.Parameter(self.bias.detach().clone())
        return linear

    @property
    def result(self) -> fx.Node:
        return self.output if self.output is not None else self.node

    def describe(self) -> str:
        form = type(self.module).__name__ if self.module is not None else str(self.node.target)
        return f"{self.name} ({form})"

    def matches(self, pattern: str, *names: str) -> bool:
        """Whether the glob ``pattern`` matches the layer's name, its node's name or one of ``names``."""
        return any(fnmatch.fnmatchcase(name, pattern) for name in (self.name, self.node.name, *names))

    def why_not_decomposable(self) -> str | None:
        """Why fxreduce's decomposed LSTM cannot stand in for this LSTM layer (so no pass rewrites it), or None."""
        if self.module is None:
            return "an aten-level lstm (torch.export graph) has no module to rewrite; capture with method='fx'"
        if getattr(self.module, "proj_size", 0):
            return f"proj_size is unsupported by the decomposed LSTM (proj_size={self.module.proj_size})"
        return None


def _is_conv1d(module: torch.nn.Module) -> bool:
    """transformers' Conv1D (GPT-2's projections): an affine map with its weight stored (in, out)."""
    cls = type(module)
    return cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers")


def _module_kind(module: torch.nn.Module) -> str | None:
    """The layer kind of a module: torch's by type, transformers' Conv1D, and a runtime module's own
    ``fxreduce_kind`` (fxreduce's decomposed LSTM is an "lstm" a later pass may rewrite again)."""
    if _is_conv1d(module):
        return "linear"
    return _MODULE_KINDS.get(type(module)) or getattr(type(module), "fxreduce_kind", None)


def _const(gm: fx.GraphModule, arg: Any) -> torch.Tensor | None:
    if isinstance(arg, fx.Node) and arg.op == "get_attr":
        value = _fetch(gm, arg.target)
        return value if isinstance(value, torch.Tensor) else None
    return None


def _fetch(gm: fx.GraphModule, target: str) -> Any:
    value: Any = gm
    for part in target.split("."):
        value = getattr(value, part)
    return value


def _arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _pair(value: Any) -> tuple[int, int]:
    if isinstance(value, (list, tuple)):
        return (value[0], value[0]) if len(value) == 1 else tuple(value)
    return (value, value)


def _module_layer(gm: fx.GraphModule, node: fx.Node, module: torch.nn.Module, kind: str) -> Layer:
    stored = getattr(module, "weight", None)
    weight = stored.t() if _is_conv1d(module) else stored
    layer = Layer(kind, node, "module", node.target, module=module, weight=weight, bias=getattr(module, "bias", None),
                  parameter=stored)
    if kind == "conv2d":
        layer.attrs = dict(stride=module.stride, padding=module.padding, dilation=module.dilation,
                           groups=module.groups, padding_mode=module.padding_mode)
    elif kind == "batchnorm":
        layer.attrs = dict(eps=module.eps, running_mean=module.running_mean, running_var=module.running_var,
                           training=module.training or module.running_mean is None)
    elif kind == "dropout":
        layer.attrs = dict(p=module.p, training=module.training)
    elif kind == "lstm":
        layer.attrs = dict(training=module.training)
    return layer


def _function_layer(gm: fx.GraphModule, node: fx.Node, kind: str) -> Layer | None:
    target = node.target
    dialect = "aten" if isinstance(target, torch._ops.OpOverload) else "function"
    name = node.name
    if kind == "linear":
        if target in _MATMULS:
            return _matmul_layer(gm, node, dialect)
        weight_arg, bias_arg = _arg(node, 1, "weight"), _arg(node, 2, "bias")
        weight, bias = _const(gm, weight_arg), _const(gm, bias_arg)
        if bias_arg is not None and bias is None:
            return None
        return Layer(kind, node, dialect, _owner_name(weight_arg, node), weight=weight, bias=bias)
    if kind == "conv2d":
        return Layer(kind, node, dialect, name, weight=_const(gm, _arg(node, 1, "weight")),
                     bias=_const(gm, _arg(node, 2, "bias")),
                     attrs=dict(stride=_pair(_arg(node, 3, "stride", 1)), padding=_pair(_arg(node, 4, "padding", 0)),
                                dilation=_pair(_arg(node, 5, "dilation", 1)), groups=_arg(node, 6, "groups", 1),
                                padding_mode="zeros"))
    if kind == "dropout":
        default_training = dialect == "function"
        training = _arg(node, 2, "training" if dialect == "function" else "train", default_training)
        return Layer(kind, node, dialect, name,
                     attrs=dict(p=_arg(node, 1, "p", 0.5), training=bool(training)))
    if kind == "batchnorm":
        if target is aten._native_batch_norm_legit_no_training.default:
            users = list(node.users)
            if len(users) != 1 or users[0].target is not operator.getitem or users[0].args[1] != 0:
                return None
            weight, bias, mean, var = (_const(gm, a) for a in node.args[1:5])
            return Layer(kind, node, dialect, name, weight=weight, bias=bias, output=users[0],
                         attrs=dict(eps=node.args[6], running_mean=mean, running_var=var, training=False))
        if target is aten.batch_norm.default:
            weight, bias, mean, var = (_const(gm, a) for a in node.args[1:5])
            training, eps = node.args[5], node.args[7]
        else:
            mean, var = _const(gm, _arg(node, 1, "running_mean")), _const(gm, _arg(node, 2, "running_var"))
            weight, bias = _const(gm, _arg(node, 3, "weight")), _const(gm, _arg(node, 4, "bias"))
            training, eps = _arg(node, 5, "training", False), _arg(node, 7, "eps", 1e-5)
        return Layer(kind, node, dialect, name, weight=weight, bias=bias,
                     attrs=dict(eps=eps, running_mean=mean, running_var=var, training=bool(training) or mean is None))
    if kind == "lstm":
        return Layer(kind, node, dialect, name, attrs=dict(training=bool(node.args[7])))
    return None


def _transposed_source(node: Any) -> fx.Node | None:
    """The get_attr node a 2-D transpose (t, .T, transpose(0, 1), permute(1, 0)) reads, else None."""
    if not isinstance(node, fx.Node) or not node.args or not isinstance(node.args[0], fx.Node):
        return None
    source, rest = node.args[0], tuple(node.args[1:])
    if source.op != "get_attr":
        return None
    if node.op == "call_function" and node.target is getattr and rest in (("T",), ("mT",)):
        return source
    target = node.target if node.op == "call_function" else getattr(torch.Tensor, str(node.target), None)
    if target in (torch.t, aten.t.default, aten.numpy_T.default, torch.Tensor.t):
        return source
    if target in (torch.transpose, aten.transpose.int, torch.Tensor.transpose) and len(rest) == 2:
        return source if {int(d) % 2 for d in rest} == {0, 1} else None
    if target in (torch.permute, aten.permute.default, torch.Tensor.permute):
        dims = rest[0] if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        return source if [int(d) % 2 for d in dims] == [1, 0] else None
    return None


def _matmul_layer(gm: fx.GraphModule, node: fx.Node, dialect: str) -> Layer | None:
    """addmm(b, x, R) / mm(x, R) / matmul(x, R) / x @ R with R = W^T a constant (stored (in, out)) or
    the transpose of a constant W (stored (out, in)); None for any other product."""
    addmm = node.target in (torch.addmm, aten.addmm.default)
    if addmm and any(node.kwargs.get(k, 1) != 1 for k in ("beta", "alpha")):
        return None
    operands = node.args[1:3] if addmm else node.args[:2]
    if len(operands) != 2 or not isinstance(operands[0], fx.Node):
        return None
    right = operands[1]
    source = _transposed_source(right)
    if source is not None:
        weight = _fetch(gm, source.target)
        stored = weight
    else:
        stored = _const(gm, right)
        if stored is None:
            return None
        weight = stored.t() if stored.dim() == 2 else None
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2:
        return None
    bias = None
    if addmm:
        bias = _const(gm, node.args[0])
        if bias is None or bias.shape != (weight.shape[0],):
            return None
    return Layer("linear", node, dialect, _owner_name(source if source is not None else right, node), weight=weight,
                 bias=bias, input_index=1 if addmm else 0, parameter=stored)


def _owner_name(weight: Any, node: fx.Node) -> str:
    """A functional linear layer's name: the module holding its weight ("h.0.attn.c_attn"), else the node's."""
    if isinstance(weight, fx.Node) and weight.op == "get_attr" and "." in weight.target:
        return weight.target.rsplit(".", 1)[0]
    return node.name


def _storage(tensor: torch.Tensor) -> int | None:
    """Where a real tensor's data lives (views share it); None for fake and meta tensors, which have none."""
    if isinstance(tensor, FakeTensor) or tensor.device.type == "meta":
        return None
    return tensor.untyped_storage().data_ptr()


def _tied_names(gm: fx.GraphModule, layer: Layer) -> tuple[str, ...]:
    """Other names and other graph users of the tensor holding a linear layer's weight."""
    if layer.parameter is None:
        return ()
    key = _storage(layer.parameter)

    def same(tensor: torch.Tensor) -> bool:
        return tensor is layer.parameter or (key is not None and _storage(tensor) == key)

    own = {f"{layer.node.target}.weight"} if layer.dialect == "module" else set()
    weight_nodes = []
    for arg in layer.node.all_input_nodes:
        source = arg if arg.op == "get_attr" else _transposed_source(arg)
        if source is not None and source.op == "get_attr" and _fetch(gm, source.target) is layer.parameter:
            own.add(source.target)
            weight_nodes += [source, arg]
    names = [name for name, tensor in gm.named_parameters(remove_duplicate=False)
             if same(tensor) and name not in own]
    allowed = {layer.node, *weight_nodes}
    for node in weight_nodes:
        names += [user.name for user in node.users if user not in allowed]
    return tuple(dict.fromkeys(names))


def find_layers(gm: fx.GraphModule, kinds: Iterable[str] | None = None) -> list[Layer]:
    """Every layer of the requested kinds, in graph order, whatever form the graph holds it in."""
    wanted = set(kinds) if kinds is not None else None
    layers = []
    for node in gm.graph.nodes:
        layer = None
        if node.op == "call_module":
            module = gm.get_submodule(node.target)
            kind = _module_kind(module)
            if kind and (wanted is None or kind in wanted):
                layer = _module_layer(gm, node, module, kind)
        elif node.op == "call_function":
            kind = _FUNCTION_KINDS.get(node.target)
            if kind and (wanted is None or kind in wanted):
                layer = _function_layer(gm, node, kind)
        if layer is not None:
            if layer.kind == "linear":
                layer.tied_with = _tied_names(gm, layer)
            layers.append(layer)
    return layers


def only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def find_chains(gm: fx.GraphModule, kinds: Sequence[str]) -> list[list[Layer]]:
    """Chains of layers of the given kinds, each feeding only the next (e.g. ("conv2d", "batchnorm"))."""
    by_node = {layer.node: layer for layer in find_layers(gm, set(kinds))}
    chains = []
    for layer in by_node.values():
        if layer.kind != kinds[0]:
            continue
        chain = [layer]
        for kind in kinds[1:]:
            user = only_user(chain[-1].result)
            following = by_node.get(user) if user is not None else None
            if following is None or following.kind != kind or following.input is not chain[-1].result:
                break
            chain.append(following)
        if len(chain) == len(kinds):
            chains.append(chain)
    return chains


def unique_name(gm: fx.GraphModule, base: str) -> str:
    """A submodule name not yet used in gm, derived from ``base``."""
    stem = re.sub(r"[^0-9a-zA-Z_]", "_", base) or "module"
    name, index = stem, 1
    while hasattr(gm, name):
        index += 1
        name = f"{stem}_{index}"
    return name


def replace_layer(gm: fx.GraphModule, layer: Layer, module: torch.nn.Module, *, pass_name: str,
                  name: str | None = None, args: tuple | None = None, kwargs: dict | None = None) -> fx.Node:
    """Swap ``layer`` for a call of ``module`` on the layer's input (or ``args``/``kwargs``); returns the new node.

    A module layer called from one place keeps its submodule name; otherwise the new submodule gets
    ``name`` or a name derived from the layer's.
    """
    reuse = (layer.dialect == "module" and name is None
             and len(gm.graph.find_nodes(op="call_module", target=layer.node.target)) == 1)
    target = layer.node.target if reuse else unique_name(gm, name or f"{layer.name}_{pass_name}")
    if not reuse:
        gm.add_submodule(target, module)
    with gm.graph.inserting_before(layer.node):
        new = gm.graph.call_module(target, args if args is not None else (layer.input,), kwargs)
    meta.mark_rewritten(new, pass_name, replaced=layer.node.name)
    layer.result.replace_all_uses_with(new)
    _erase(gm, layer)
    if reuse:
        gm.add_submodule(target, module)
    return new


def bypass(gm: fx.GraphModule, layer: Layer, replacement: fx.Node | None = None) -> None:
    """Remove ``layer``: its users read ``replacement`` (default: the layer's own input) instead."""
    layer.result.replace_all_uses_with(replacement if replacement is not None else layer.input)
    _erase(gm, layer)


def _erase(gm: fx.GraphModule, layer: Layer) -> None:
    if layer.output is not None:
        gm.graph.erase_node(layer.output)
    inputs = layer.node.all_input_nodes
    gm.graph.erase_node(layer.node)
    for node in inputs:
        if _transposed_source(node) is not None and not node.users:
            inputs.append(node.args[0])
            gm.graph.erase_node(node)
        elif node.op == "get_attr" and not node.users:
            gm.graph.erase_node(node)
            _drop_unread(gm, node.target)
    if layer.dialect == "module" and not gm.graph.find_nodes(op="call_module", target=layer.node.target):
        gm.delete_submodule(layer.node.target)


def _drop_unread(gm: fx.GraphModule, target: str) -> None:
    """Delete a constant no node reads any more (a replaced layer's weight), and its emptied owner module."""
    if gm.graph.find_nodes(op="get_attr", target=target):
        return
    owner_path, _, attr = target.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    if attr in owner._parameters or attr in owner._buffers:
        delattr(owner, attr)
    used = {node.target for node in gm.graph.nodes if node.op in ("call_module", "get_attr")}
    while owner_path and not any(True for _ in owner.children()) and not owner._parameters and not owner._buffers \
            and not any(name == owner_path or name.startswith(owner_path + ".") for name in used):
        gm.delete_submodule(owner_path)
        owner_path = owner_path.rpartition(".")[0]
        owner = gm.get_submodule(owner_path) if owner_path else gm


def to_networkx(gm: fx.GraphModule) -> nx.DiGraph:
    """The graph as a networkx DiGraph keyed by node name, with op/target/shape/cost attributes."""
    graph = nx.DiGraph()
    for node in gm.graph.nodes:
        info = meta.info(node)
        graph.add_node(node.name, node=node, op=node.op, target=node.target,
                       shape=info.shape if info else None, cost=info.cost if info else None)
        for source in node.all_input_nodes:
            graph.add_edge(source.name, node.name)
    return graph


def region_between(gm: fx.GraphModule, source: fx.Node, sink: fx.Node) -> set[str]:
    """Names of the nodes on some path from ``source`` to ``sink`` (both included)."""
    graph = to_networkx(gm)
    if source.name == sink.name:
        return {source.name}
    between = nx.descendants(graph, source.name) & nx.ancestors(graph, sink.name)
    return between | {source.name, sink.name} if between or graph.has_edge(source.name, sink.name) else set()


def dominators(gm: fx.GraphModule) -> dict[str, str]:
    """Immediate dominator of every node the inputs reach (the virtual root is "<inputs>").

    Only data flow from the inputs counts: parameters and constants are not paths around a node.
    """
    graph = to_networkx(gm)
    root = "<inputs>"
    graph.add_node(root)
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            graph.add_edge(root, node.name)
    return {k: v for k, v in nx.immediate_dominators(graph, root).items() if k != root}
