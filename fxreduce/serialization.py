"""Saving a rewritten model as plain data and rebuilding it, so that loading a file never runs its code.

A pickled GraphModule would carry code that runs on load. An fxreduce save instead holds a manifest
(format version, model reference, pipeline spec, input shape, seed) and the rewritten graph's
state_dict, written by torch.save and read by torch.load(weights_only=True), which refuses anything
but tensors and plain containers. The file also carries a SHA-256 digest of the manifest and of every
tensor, checked on load (torch's own reader checks no checksum). Loading shows the manifest first, then rebuilds the graph the way it
was made (model reference -> trace -> pipeline, with the same seed) and loads the weights strictly.
The only code a load runs is the installed package the manifest names: saves refuse file paths.

``export`` is the other route: torch.export's own format (.pt2), for pipelines whose passes all
export; it needs no rebuild because the file holds the graph as aten ops.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import sys
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, Iterator

import torch
import torch.fx as fx

from .cost_models import graph_info
from .errors import FxReduceError, InputError, LoadError, UnsupportedError
from .files import atomic_path, digest, load_tensors
from .models import InputShape, default_example_size, load_model, parse_input_shape, ref_kind
from .pipeline import Pipeline, PipelineResult
from .text import first_sentence
from .tracing import dynamic_shapes, trace

FORMAT = "fxreduce.rewritten-graph"
VERSION = 2
EXPORT_MANIFEST = "fxreduce.json"
try:
    _FXREDUCE_VERSION = importlib.metadata.version("fxreduce")
except importlib.metadata.PackageNotFoundError:
    _FXREDUCE_VERSION = "unknown"
_KEYS = {"model": str, "pipeline": str, "input_shape": str, "seed": int, "fxreduce_version": str, "torch_version": str}


@dataclass(frozen=True)
class Manifest:
    """What a saved file says it is: enough to rebuild the graph, shown to the user before anything runs."""

    model: str
    pipeline: str
    input_shape: str
    seed: int
    fxreduce_version: str = _FXREDUCE_VERSION
    torch_version: str = str(torch.__version__)

    def lines(self) -> list[str]:
        return [f"model:       {self.model}", f"pipeline:    {self.pipeline}", f"input shape: {self.input_shape}",
                f"seed:        {self.seed}",
                f"written by:  fxreduce {self.fxreduce_version}, torch {self.torch_version}"]


@dataclass
class Built:
    """A model reference traced on an input shape and rewritten by a pipeline."""

    original: fx.GraphModule
    result: PipelineResult
    shape: InputShape

    @property
    def graph_module(self) -> fx.GraphModule:
        return self.result.graph_module


@dataclass
class Loaded:
    """A loaded file: the rewritten graph (with fxreduce metadata) and its manifest.

    ``built`` holds the rebuild (original graph, report) for an fxreduce save; None for a .pt2 export.
    """

    graph_module: fx.GraphModule
    manifest: Manifest | None
    built: Built | None = None


def build(model_ref: str, input_shape: str, pipeline: str, seed: int = 0, *, allow_path: bool = True) -> Built:
    """Model reference -> traced graph -> rewritten graph, deterministic for a seed.

    The seed fixes the model's random initialisation, the example inputs and the passes, so a load
    rebuilds exactly the graph that was saved.
    """
    steps = Pipeline(pipeline, seed=seed)
    model = load_model(model_ref, allow_path=allow_path, seed=seed)
    shape = parse_input_shape(input_shape, default_size=default_example_size(model_ref), seed=seed)
    original = trace(model, shape.inputs, shape.dims)
    return Built(original, steps(original), shape)


def write_markdown_section(path: str | os.PathLike, title: str, body: str, heading: str) -> None:
    """Replace the ``## title`` section of the markdown file ``path`` (or append it; a new file starts with
    ``heading``), atomically: the examples and benchmarks each rewrite only their own part of a doc."""
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    section = f"## {title}\n\n{body.strip()}\n"
    text = open(path, encoding="utf-8").read() if os.path.exists(path) else heading.rstrip() + "\n"
    pattern = re.compile(rf"^## {re.escape(title)}\n.*?(?=^## |\Z)", re.S | re.M)
    text = pattern.sub(lambda _: section + "\n", text) if pattern.search(text) else text.rstrip() + "\n\n" + section
    with atomic_path(path) as temporary, open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)


def save(path: str | os.PathLike, graph_module: fx.GraphModule, *, model_ref: str, pipeline_spec: str,
         input_spec_text: str, seed: int) -> Manifest:
    """Write ``graph_module``'s weights and the recipe that rebuilds it; returns the manifest written.

    ``model_ref`` must be importable without a file path (torchvision:NAME, package.module:factory or
    the demo): a loader must not import code from an arbitrary file.
    """
    if ref_kind(model_ref) == "path":
        raise InputError(f"cannot save a model loaded from the file path {model_ref!r}", where="save",
                         fix="make the model an installed package (pip install -e .) and refer to it as "
                             "package.module:factory, or export it with -o FILE.pt2")
    state = graph_module.state_dict()
    extra = sorted(key for key, value in state.items() if not isinstance(value, torch.Tensor))
    if extra:
        raise UnsupportedError(f"the graph's state holds non-tensor entries ({', '.join(extra)})", where="save",
                               fix="save as a torch.export .pt2 file instead")
    # Written out in full (every option, every example size), so later defaults cannot change the rebuild.
    shape = parse_input_shape(input_spec_text, default_size=default_example_size(model_ref), seed=seed)
    spec = Pipeline(pipeline_spec, seed=seed).spec
    try:
        Pipeline(spec, seed=seed)
    except FxReduceError as error:
        raise UnsupportedError(f"the pipeline cannot be written as a spec to rebuild from: {error}", where="save",
                               fix="give options as literals (not objects such as nn.Modules), or export with "
                                   "-o FILE.pt2") from None
    manifest = Manifest(model_ref, spec, shape.text, seed)
    with atomic_path(path) as temporary:
        torch.save(seal({"format": FORMAT, "version": VERSION, **asdict(manifest), "state_dict": state}), temporary)
    return manifest


def _manifest_digest(contents: dict) -> str:
    return hashlib.sha256(json.dumps({key: contents[key] for key in _KEYS}, sort_keys=True).encode()).hexdigest()


def seal(contents: dict) -> dict:
    """A save's contents with the digests a load checks: of the manifest and of every tensor."""
    return {**contents, "manifest_digest": _manifest_digest(contents),
            "digests": {name: digest(tensor) for name, tensor in contents["state_dict"].items()}}


def _confirm(confirm: Callable[[Manifest], bool | None] | None, manifest: Manifest, path: str) -> None:
    """Show the manifest (to ``confirm``, else on stderr); stop if ``confirm`` says no."""
    if confirm is None:
        print(f"fxreduce: loading {path}; its manifest says:", file=sys.stderr)
        for line in manifest.lines():
            print(f"  {line}", file=sys.stderr)
    elif confirm(manifest) is False:
        raise LoadError(f"loading {path!r} was declined", where=path, fix="inspect the manifest and load it if trusted")


def _read(path: str) -> dict:
    """The file's contents, after checking that they are exactly what :func:`save` wrote."""
    rewrite = "write it again with `fxreduce apply MODEL --pipeline SPEC -o FILE.pt`"
    data = load_tensors(path, error=LoadError, what="fxreduce save", fix=rewrite)
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        held = (f"a dict with keys {', '.join(map(str, list(data)[:5]))}" if isinstance(data, dict)
                else type(data).__name__)
        raise LoadError(f"{path!r} is not an fxreduce save (it holds {held})", where=path,
                        fix="load a file written by `fxreduce apply -o FILE.pt` (plain checkpoints load with "
                            "torch.load)")
    if not isinstance(data.get("version"), int) or data["version"] > VERSION:
        raise LoadError(f"{path!r} has save format version {data.get('version')!r}; this fxreduce reads up to "
                        f"{VERSION}", where=path, fix="upgrade fxreduce")
    if data["version"] < VERSION:
        raise LoadError(f"{path!r} has save format version {data['version']}, which carries no digests to check "
                        f"its weights against", where=path, fix=rewrite)
    wrong = [key for key, kind in _KEYS.items() if not isinstance(data.get(key), kind)]
    wrong += [key for key in ("state_dict", "digests") if not isinstance(data.get(key), dict)]
    if wrong:
        raise LoadError(f"{path!r} is a damaged fxreduce save: fields {', '.join(wrong)} are missing or of the "
                        f"wrong type", where=path, fix=rewrite)
    if data.get("manifest_digest") != _manifest_digest(data):
        raise LoadError(f"{path!r} is damaged: its manifest does not match the digest saved with it", where=path,
                        fix=rewrite)
    state, digests = data["state_dict"], data["digests"]
    if set(state) != set(digests):
        raise LoadError(f"{path!r} is damaged: its tensors ({len(state)}) and their digests ({len(digests)}) "
                        f"do not name the same entries", where=path, fix=rewrite)
    for name, tensor in state.items():
        if not isinstance(tensor, torch.Tensor) or digest(tensor) != digests[name]:
            raise LoadError(f"{path!r} is damaged: tensor {name!r} differs from what was saved (digest mismatch)",
                            where=path, fix=rewrite)
    return data


def load(path: str | os.PathLike, *, confirm: Callable[[Manifest], bool | None] | None = None) -> Loaded:
    """Load a file written by :func:`save` without running code from it.

    The manifest goes to ``confirm`` (default: printed on stderr) before any model code is imported;
    returning False from ``confirm`` stops the load. Every problem raises LoadError.
    """
    path = os.fspath(path)
    data = _read(path)
    manifest = Manifest(**{key: data[key] for key in _KEYS})
    _confirm(confirm, manifest, path)
    if ref_kind(manifest.model) == "path":
        raise LoadError(f"{path!r} asks to import model code from the file path {manifest.model!r}", where=path,
                        fix="fxreduce saves name installed packages only; do not trust this file")
    try:
        built = build(manifest.model, manifest.input_shape, manifest.pipeline, manifest.seed, allow_path=False)
    except FxReduceError as error:
        raise LoadError(f"cannot rebuild the model {path!r} was written from: {error}", where=path,
                        fix="install what the manifest names (same fxreduce / torch versions)") from error
    try:
        built.graph_module.load_state_dict(data["state_dict"], strict=True)
    except RuntimeError as error:
        detail = " ".join(line.strip() for line in str(error).splitlines()[1:3])
        raise LoadError(f"the saved weights do not fit the rebuilt graph: {detail}", where=path,
                        fix=f"rebuild with fxreduce {manifest.fxreduce_version} and torch {manifest.torch_version} "
                            f"(the file's versions), or apply the pipeline again") from None
    return Loaded(built.graph_module, manifest, built)


def export(path: str | os.PathLike, graph_module: fx.GraphModule, *, manifest: Manifest | None = None) -> None:
    """Write ``graph_module`` as a torch.export program (.pt2), with its named dims kept dynamic.

    The named dims and the optional manifest ride along as an extra file, so a load can re-trace the
    program with the same symbolic dims.
    """
    info = graph_info(graph_module)
    inputs = info.spec.example_inputs
    try:
        program = torch.export.export(graph_module, tuple(inputs), dynamic_shapes=dynamic_shapes(info.spec),
                                      strict=False)
    except Exception as error:
        raise UnsupportedError(f"torch.export cannot export the rewritten graph: {type(error).__name__}: "
                               f"{first_sentence(error)}", where="export",
                               fix="save it as an fxreduce .pt file instead") from error
    # A dim with tied axes (an attention mask's beside input_ids') is written as the list of its positions.
    extra = {"dims": {name: [list(p) for p in info.spec.positions(name)] if info.spec.tied.get(name) else list(position)
                      for name, position in info.spec.dims.items()},
             "manifest": asdict(manifest) if manifest else None}
    with atomic_path(path) as temporary:
        torch.export.save(program, temporary, extra_files={EXPORT_MANIFEST: json.dumps(extra)})


@contextlib.contextmanager
def _quiet_torch_export() -> Iterator[None]:
    """torch.export logs load failures with their tracebacks; the LoadError raised instead says it in one line."""
    logger = logging.getLogger("torch.export")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def load_export(path: str | os.PathLike, *, trusted: bool = False,
                confirm: Callable[[Manifest], bool | None] | None = None) -> Loaded:
    """Load a .pt2 written by :func:`export`, re-traced so it carries shapes and costs again.

    torch.export.load falls back to full unpickling for parts of the archive (sample inputs, pickled
    weights), so a crafted .pt2 can run code: it loads only with ``trusted=True``.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise LoadError(f"no such file {path!r}", where=path, fix="check the path; `fxreduce apply MODEL --pipeline "
                                                                  "SPEC -o FILE.pt2` writes one")
    if not trusted:
        raise LoadError(f"{path!r} is a torch.export file, and torch.export.load may run code stored in it",
                        where=path, fix="load it only if you trust its source (--trust on the command line, "
                                        "trusted=True in Python), or use an fxreduce .pt save")
    extra = {EXPORT_MANIFEST: ""}
    try:
        with _quiet_torch_export():
            program = torch.export.load(path, extra_files=extra)
        recorded = json.loads(extra[EXPORT_MANIFEST] or "{}")
        dims = {name: [tuple(p) for p in position] if position and isinstance(position[0], list) else tuple(position)
                for name, position in recorded.get("dims", {}).items()}
        manifest = Manifest(**recorded["manifest"]) if recorded.get("manifest") else None
    except Exception as error:
        raise LoadError(f"{path!r} is not a readable torch.export file: {type(error).__name__}: "
                        f"{first_sentence(error)}", where=path,
                        fix="write it again with `fxreduce apply ... -o FILE.pt2`") from None
    if manifest is not None:
        _confirm(confirm, manifest, path)
    if program.example_inputs is None:
        raise LoadError(f"{path!r} holds no example inputs to trace it with", where=path,
                        fix="write it again with `fxreduce apply ... -o FILE.pt2`")
    args, _ = program.example_inputs
    return Loaded(trace(program.module(), args, dims), manifest)
