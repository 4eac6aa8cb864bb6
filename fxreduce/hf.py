"""Hugging Face transformers models: captured as they ship, and small-config factories for the CLI.

fxreduce.trace calls the capture helpers here when the model is a transformers ``PreTrainedModel``;
transformers is never imported for other models. What they do:

- keyword inputs: ``fr.trace(model, {"input_ids": ids, "attention_mask": mask}, ...)`` captures a forward
  whose positional parameters are those names, in that order (the model's class is swapped for a
  subclass on fxreduce's private copy; the user's model is untouched). Non-tensor values (``use_cache``,
  ``output_attentions``, ...) become constants of the captured call;
- caches: transformers' cache classes (DynamicCache, ...) are registered as pytree nodes with
  transformers' own helper, so torch.export can return them and the graph's outputs include the cache
  as the model builds it. Where that fails, the cache is dropped (``use_cache=False``) and the graph's
  ``graph_info(gm).notes`` says so; a cache never makes capture fail;
- a cache object passed *as input* is refused (fxreduce captures a whole-sequence forward);
- inputs shaped like ``input_ids`` (``attention_mask``, ``token_type_ids``, ``position_ids``) share its
  named dims N and T unless told otherwise;
- when capture still fails, the TraceError's fix names what to do for a transformers model.

The factories (``fxreduce.hf:gpt2`` and so on) build the five families from small configs with random
weights, nothing downloaded: ``fxreduce cost fxreduce.hf:gpt2 --input-shape N,T:long``.
"""

from __future__ import annotations

import inspect
import keyword
import sys
from typing import Any, Mapping, Sequence

import torch

# Inputs a transformers model takes in the shape of input_ids (N, T); they share its named dims.
SHAPED_LIKE_IDS = ("attention_mask", "token_type_ids", "position_ids")
CACHE_DROPPED = ("the model's cache (past_key_values) is not part of the graph's outputs: torch.export could "
                 "not return its cache class ({reason}), so the graph was captured with use_cache=False")


def is_transformers_model(model: Any) -> bool:
    """Whether ``model`` is a transformers PreTrainedModel (without importing transformers)."""
    transformers = sys.modules.get("transformers")
    if transformers is None:
        return False
    try:
        return isinstance(model, transformers.PreTrainedModel)
    except Exception:  # transformers installed without torch support
        return False


def is_cache(value: Any) -> bool:
    """Whether ``value`` is a transformers cache object (a Cache subclass, or a model's own *Cache class)."""
    cls = type(value)
    if not cls.__module__.startswith("transformers"):
        return False
    if cls.__name__.endswith("Cache"):
        return True
    try:
        from transformers.cache_utils import Cache
    except ImportError:
        return False
    return isinstance(value, Cache)


def register_caches(model: torch.nn.Module) -> str | None:
    """Register transformers' cache classes as pytree nodes (transformers' own helper), so torch.export
    can take and return them. None when done, else why not."""
    try:
        from transformers.exporters.exporter_dynamo import register_cache_pytrees_for_model
    except ImportError:
        register_cache_pytrees_for_model = None
    try:
        if register_cache_pytrees_for_model is not None:
            register_cache_pytrees_for_model(model)
            return None
        from transformers.integrations.executorch import register_dynamic_cache_export_support
    except ImportError:
        return "this transformers version has no helper that registers its cache classes for torch.export"
    except Exception as error:  # a model-specific cache class that cannot be registered
        return f"registering its cache classes failed: {type(error).__name__}: {error}"
    register_dynamic_cache_export_support()
    return None


def accepts_cache_flag(cls: type) -> bool:
    """Whether the forward of model class ``cls`` takes use_cache."""
    parameters = inspect.signature(cls.forward).parameters
    return "use_cache" in parameters or any(p.kind is p.VAR_KEYWORD for p in parameters.values())


def uses_cache(model: torch.nn.Module) -> bool:
    return bool(getattr(getattr(model, "config", None), "use_cache", False))


def is_cache_failure(error: BaseException) -> bool:
    """Whether a capture failure is about a cache class (not a pytree node, cannot be flattened)."""
    text = f"{type(error).__name__}: {error}"
    return "Cache" in text and ("pytree" in text or "not a known type" in text or "flatten" in text)


def positional_forward(model: torch.nn.Module, names: Sequence[str], constants: Mapping[str, Any]) -> None:
    """Give ``model`` (fxreduce's private copy) a forward whose positional parameters are ``names``,
    calling the original forward by keyword, with ``constants`` as further keyword arguments.

    The class is swapped for a subclass of the same name: torch.fx traces ``type(model).forward``, and
    torch.export reads its signature. The forward is compiled from source so both see real parameters.
    """
    for name in names:
        if not name.isidentifier() or keyword.iskeyword(name) or name == "self":
            from .errors import InputError

            raise InputError(f"keyword input {name!r} is not a parameter name", where="example_inputs",
                             fix="name keyword inputs as the model's forward does, e.g. input_ids")
    base = type(model)
    namespace = {"_forward": base.forward, "_constants": dict(constants)}
    arguments = ", ".join(f"{name}={name}" for name in names)
    source = (f"def forward(self, {', '.join(names)}):\n"
              f"    return _forward(self, {arguments}{', ' if names else ''}**_constants)\n")
    exec(compile(source, f"<fxreduce keyword inputs of {base.__name__}>", "exec"), namespace)
    model.__class__ = type(base.__name__, (base,), {"forward": namespace["forward"], "__module__": base.__module__,
                                                     "__qualname__": base.__qualname__})


def capture_fix(errors: Sequence[tuple[str, BaseException]], keyword_inputs: bool) -> str:
    """The fix a TraceError names for a transformers model, from what failed."""
    tried = {how for how, _ in errors}
    texts = " ".join(f"{type(e).__name__}: {e}" for _, e in errors)
    if tried == {"torch.fx.symbolic_trace"}:
        return ("transformers models are not torch.fx-traceable as they ship (their forward builds masks and "
                "caches in Python); use method='auto' or method='export', which captures them with torch.export")
    fixes = []
    if not keyword_inputs:
        fixes.append("pass the inputs by keyword as transformers names them, e.g. "
                     "example_inputs={'input_ids': ids, 'attention_mask': mask}")
    if "Cache" in texts:
        fixes.append("build the model with use_cache=False (config.use_cache = False)")
    if "DataDependent" in texts or "data-dependent" in texts or "data dependent" in texts:
        fixes.append("the model branches on tensor values; give it the inputs it branches on as constants "
                     "(e.g. leave attention_mask out when there is no padding) or capture its submodules")
    fixes.append("load it with attn_implementation='sdpa' or 'eager' (custom attention kernels do not export)")
    fixes.append("transformers' own exporter (transformers.exporters) patches more models for torch.export")
    return "for a transformers model: " + "; ".join(fixes)


# ---------------------------------------------------------------------------------------------------------
# Small-config factories: the five families, random weights, nothing downloaded.

_VOCAB = 512
_POSITIONS = 128


def _quiet():
    import transformers

    transformers.logging.set_verbosity_error()
    return transformers


def gpt2() -> torch.nn.Module:
    """GPT-2 base (GPT2Model): 2 blocks, 4 heads of 16, Conv1D projections; cache on, as it ships."""
    t = _quiet()
    config = t.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=_VOCAB, n_positions=_POSITIONS,
                          bos_token_id=_VOCAB - 1, eos_token_id=_VOCAB - 1)
    return t.GPT2Model(config).eval()


def gpt2_lm() -> torch.nn.Module:
    """GPT-2 with its language-model head (GPT2LMHeadModel); the head is tied to the token embedding."""
    t = _quiet()
    config = t.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=_VOCAB, n_positions=_POSITIONS,
                          bos_token_id=_VOCAB - 1, eos_token_id=_VOCAB - 1)
    return t.GPT2LMHeadModel(config).eval()


def bert() -> torch.nn.Module:
    """BERT (BertModel): 2 layers, 4 heads of 16, with its pooler."""
    t = _quiet()
    config = t.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                          vocab_size=_VOCAB, max_position_embeddings=_POSITIONS)
    return t.BertModel(config).eval()


def _llama(tied: bool) -> torch.nn.Module:
    t = _quiet()
    config = t.LlamaConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                           intermediate_size=128, vocab_size=_VOCAB, max_position_embeddings=_POSITIONS,
                           tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return t.LlamaForCausalLM(config).eval()


def llama() -> torch.nn.Module:
    """Llama (LlamaForCausalLM): 2 layers, 4 query heads sharing 2 key/value heads (GQA), RoPE, untied head."""
    return _llama(tied=False)


def llama_tied() -> torch.nn.Module:
    """Llama as :func:`llama`, with the head tied to the token embedding."""
    return _llama(tied=True)


def vit() -> torch.nn.Module:
    """ViT (ViTModel): 32 x 32 images in 8 x 8 patches, 2 layers, 4 heads of 16, with its pooler."""
    t = _quiet()
    config = t.ViTConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                         image_size=32, patch_size=8)
    return t.ViTModel(config).eval()


def distilbert() -> torch.nn.Module:
    """DistilBERT (DistilBertModel): 2 layers, 4 heads of 16."""
    t = _quiet()
    config = t.DistilBertConfig(dim=64, n_layers=2, n_heads=4, hidden_dim=128, vocab_size=_VOCAB,
                                max_position_embeddings=_POSITIONS)
    return t.DistilBertModel(config).eval()


FACTORIES = {"gpt2": gpt2, "gpt2_lm": gpt2_lm, "bert": bert, "llama": llama, "llama_tied": llama_tied,
             "vit": vit, "distilbert": distilbert}
