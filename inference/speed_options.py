"""The options that change how fast a job runs, read from the pipeline object itself.

``JobStarted.options`` carries them so the ETA and memory models can tell a job that offloads
to host memory, runs quantized weights or a LoRA, or was compiled, from one that does not.
They are *detected*, not declared: :func:`speed_options` looks at the pipeline as it is when
called (diffusers 0.42's attributes; older releases expose the same ones), so a caller of
``instrument()`` gets them without saying anything, and ``wantel run`` records what its flags
actually did to the pipeline.

=====================  ======================================================================
key                    value
=====================  ======================================================================
``offload``            ``"model"`` (``enable_model_cpu_offload``), ``"sequential"``
                       (``enable_sequential_cpu_offload``), ``"group"`` (diffusers group
                       offloading), or ``"none"``
``dtype``              the transformer's compute dtype (``"bfloat16"``, ``"float32"``…)
``quantization``       ``"none"``, ``"bitsandbytes-4bit"``, ``"bitsandbytes-8bit"``,
                       ``"torchao-<type>"``, ``"gguf-<type>"``, ``"quanto-<weights>"``, or
                       ``"<method>[-<type>]"`` for diffusers' other quantizers
``lora_count``         LoRA adapters loaded (0 if none)
``lora_names``         their names, comma-joined (``""`` if none)
``attention_backend``  the attention dispatcher's backend when one is set (``"flash"``,
                       ``"_native_cudnn"``…), else the processor class (``"WanAttnProcessor"``)
``compiled``           the transformer runs through ``torch.compile`` (whole or regional)
``vae_tiling``         the VAE decodes in tiles
``vae_slicing``        the VAE decodes one video of the batch at a time
``num_videos``         videos per prompt of the call
=====================  ======================================================================

A key that cannot be read is left out (absent means unknown): every probe is guarded, so an
unusual pipeline gives a smaller dict, never an exception in the middle of a generation.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Final

import torch

from telemetry.events import OptionValue

__all__ = ["SPEED_OPTION_KEYS", "each_module", "speed_options"]

#: Every key :func:`speed_options` can write, in the order it writes them.
SPEED_OPTION_KEYS: Final[tuple[str, ...]] = (
    "offload", "dtype", "quantization", "lora_count", "lora_names", "attention_backend",
    "compiled", "vae_tiling", "vae_slicing", "num_videos",
)

#: The diffusers components a transformer-based video pipeline denoises with.
_TRANSFORMERS: Final = ("transformer", "transformer_2", "unet")  # the denoisers


def speed_options(pipe: Any, *, num_videos: int | None = 1) -> dict[str, OptionValue]:
    """The speed-relevant state of ``pipe`` now, as ``JobStarted.options`` entries.

    Args:
        pipe: a diffusers pipeline (any object: what cannot be read is left out).
        num_videos: ``num_videos_per_prompt`` of the call; ``None`` leaves the key out.

    Returns:
        The keys of :data:`SPEED_OPTION_KEYS` that could be read. Never raises.
    """
    options: dict[str, OptionValue] = {}
    walks = _Walks()
    for probe in _PROBES:
        try:
            options.update(probe(pipe, walks))
        except Exception:  # a probe that cannot read this pipeline leaves its keys unknown
            continue
    if num_videos is not None:
        with contextlib.suppress(TypeError, ValueError):
            options["num_videos"] = int(num_videos)
    return options


# -- the pipeline's parts -----------------------------------------------------------------------


def _inherits_property(module: Any, name: str, expected: Any) -> bool:
    """Whether ``type(module).<name>`` is ``expected`` (not overridden by a subclass)."""
    if expected is None:
        return False
    for klass in type(module).__mro__:
        if name in klass.__dict__:
            return klass.__dict__[name] is expected
    return False


def _unwrap(module: Any) -> Any:
    """The module a ``torch.compile`` wrapper (``OptimizedModule``) runs."""
    return getattr(module, "_orig_mod", module)


def _transformers(pipe: Any) -> list[Any]:
    """The denoisers: ``transformer`` and ``transformer_2`` (Wan 2.2 A14B), or a UNet
    (``unet``), where present, unwrapped."""
    found = [getattr(pipe, name, None) for name in _TRANSFORMERS]
    return [_unwrap(module) for module in found if module is not None]


def _components(pipe: Any) -> list[torch.nn.Module]:
    """The pipeline's torch modules (its registered components)."""
    components = pipe.components
    return [value for value in components.values() if isinstance(value, torch.nn.Module)]


# -- one pass over a transformer's modules ------------------------------------------------------
#
# A 1.3B Wan transformer has ~860 modules and ~830 parameters. Four probes used to walk them
# separately, each through ``hasattr``/``getattr`` on ``nn.Module`` (whose ``__getattr__`` raises
# and catches an ``AttributeError`` for every module lacking the attribute): ~4 ms a job at
# that shape, on the caller's thread before the pipeline starts, where the device is idle and
# every millisecond is on the user's wall. One pass reading each module's ``__dict__`` gives
# the same answers (held equal to the old probes by tests/inference/test_speed_options.py) in a
# fraction of that.


@dataclass
class _Walk:
    """What one pass over a module tree (``module.modules()`` order) found."""

    layerwise_dtype: torch.dtype | None = None  # the first layerwise-casting hook's, if any
    processors: list[Any] = field(default_factory=list)
    compiled_child: bool = False  # some module has a compiled ``_call_impl``
    plain_weights: bool = True  # every parameter a plain floating-point ``nn.Parameter``


#: Per class: does it define ``processor`` itself (a property or class attribute)? Read once.
_CLASS_PROCESSOR: dict[type, bool] = {}


def each_module(root: torch.nn.Module) -> list[torch.nn.Module]:
    """``list(root.modules())``, the same modules in the same order (depth first, each once),
    without building every module's dotted name as ``named_modules`` does."""
    found: list[torch.nn.Module] = []
    seen: set[int] = set()
    stack = [root]
    while stack:
        module = stack.pop()
        if id(module) in seen:
            continue
        seen.add(id(module))
        found.append(module)
        children = module.__dict__["_modules"]
        if children:
            stack.extend(child for child in reversed(children.values()) if child is not None)
    return found


def _walk(module: torch.nn.Module) -> _Walk:
    found = _Walk()
    for child in each_module(module):
        own = child.__dict__
        registry = own.get("_diffusers_hook")
        if registry is not None and found.layerwise_dtype is None:
            hook = registry.get_hook("layerwise_casting")
            if hook is not None:
                found.layerwise_dtype = hook.compute_dtype
        processor = own.get("processor")
        if processor is None and ("processor" not in own) and _defines_processor(child):
            processor = getattr(child, "processor", None)
        if processor is not None:
            found.processors.append(processor)
        if own.get("_compiled_call_impl") is not None:
            found.compiled_child = True
        if found.plain_weights:
            for parameter in own["_parameters"].values():
                if parameter is not None and not (type(parameter) is torch.nn.Parameter
                                                  and parameter.is_floating_point()):
                    found.plain_weights = False
                    break
    return found


def _defines_processor(child: torch.nn.Module) -> bool:
    """``processor`` found other than in the instance's ``__dict__``: its class, or a child
    module, parameter or buffer of that name (rare: looked up the slow way)."""
    kind = type(child)
    known = _CLASS_PROCESSOR.get(kind)
    if known is None:
        known = _CLASS_PROCESSOR[kind] = hasattr(kind, "processor")
    own = child.__dict__
    return known or "processor" in own["_modules"] or "processor" in own["_parameters"] or \
        "processor" in own["_buffers"]


class _Walks:
    """Each transformer walked at most once per :func:`speed_options` call."""

    def __init__(self) -> None:
        self._done: dict[int, tuple[torch.nn.Module, _Walk]] = {}

    def of(self, module: torch.nn.Module) -> _Walk:
        entry = self._done.get(id(module))
        if entry is None or entry[0] is not module:
            entry = self._done[id(module)] = (module, _walk(module))
        return entry[1]


def _parameter_dtype(module: Any, walks: _Walks) -> torch.dtype:
    """diffusers' ``ModelMixin.dtype`` (``get_parameter_dtype``) from the shared walk: a
    layerwise-casting hook's compute dtype, else the first floating-point parameter's outside
    ``_keep_in_fp32_modules``, else the first floating-point buffer's, else the last dtype."""
    walk = walks.of(module)
    if walk.layerwise_dtype is not None:
        return walk.layerwise_dtype
    keep = getattr(module, "_keep_in_fp32_modules", None)
    last: torch.dtype | None = None
    for name, parameter in module.named_parameters():
        last = parameter.dtype
        if keep and any(part in name for part in keep):
            continue
        if parameter.is_floating_point():
            found: torch.dtype = parameter.dtype
            return found
    for buffer in module.buffers():
        last = buffer.dtype
        if buffer.is_floating_point():
            found = buffer.dtype
            return found
    if last is None:
        raise ValueError("no parameter or buffer to read a dtype from")
    return last


def _diffusers_dtype_property() -> Any:
    """``ModelMixin.dtype`` as diffusers defines it (``None`` without diffusers)."""
    try:
        from diffusers.models.modeling_utils import ModelMixin
    except ImportError:
        return None
    return ModelMixin.__dict__.get("dtype")


# -- probes: each returns the keys it could read ------------------------------------------------


def _offload(pipe: Any, walks: _Walks) -> dict[str, OptionValue]:
    modules = _components(pipe)
    if any(_group_offloaded(module) for module in modules):
        return {"offload": "group"}
    if any(_sequentially_offloaded(module) for module in modules):
        return {"offload": "sequential"}
    if getattr(pipe, "_all_hooks", None) or any(
            type(getattr(module, "_hf_hook", None)).__name__ == "CpuOffload" for module in modules):
        return {"offload": "model"}
    return {"offload": "none"}


def _group_offloaded(module: torch.nn.Module) -> bool:
    registry = getattr(module, "_diffusers_hook", None)
    if registry is None:
        return False
    try:
        from diffusers.hooks.group_offloading import _is_group_offload_enabled
    except ImportError:  # an older diffusers: look for the hook by its registered name
        return registry.get_hook("group_offloading") is not None
    return bool(_is_group_offload_enabled(module))


def _sequentially_offloaded(module: torch.nn.Module) -> bool:
    """accelerate's ``cpu_offload`` (what ``enable_sequential_cpu_offload`` applies) hooks the
    component and each of its submodules; the submodules' ``AlignDevicesHook`` offloads."""
    if getattr(module, "_hf_hook", None) is None:
        return False
    return any(_offloading_hook(getattr(child, "_hf_hook", None)) for child in module.modules())


def _offloading_hook(hook: Any) -> bool:
    """An ``AlignDevicesHook`` that offloads, alone or inside a ``SequentialHook``."""
    hooks = getattr(hook, "hooks", None) or (hook,)
    return any(type(one).__name__ == "AlignDevicesHook" and bool(getattr(one, "offload", False))
               for one in hooks)


def _dtype(pipe: Any, walks: _Walks) -> dict[str, OptionValue]:
    (transformer, *_) = _transformers(pipe)
    if _inherits_property(transformer, "dtype", _diffusers_dtype_property()):
        # diffusers' own property (the compute dtype, hooks included), from the shared walk
        dtype: Any = _parameter_dtype(transformer, walks)
    else:
        dtype = getattr(transformer, "dtype", None)
    if not isinstance(dtype, torch.dtype):
        dtype = next(p.dtype for p in transformer.parameters() if p.is_floating_point())
    return {"dtype": str(dtype).removeprefix("torch.")}


def _quantization(pipe: Any, walks: _Walks) -> dict[str, OptionValue]:
    (transformer, *_) = _transformers(pipe)
    quantizer = getattr(transformer, "hf_quantizer", None)
    config = getattr(quantizer, "quantization_config", None)
    if config is None:
        # A pre-quantized checkpoint's saved config (the dict form of the quantizer's config).
        model_config: Any = getattr(transformer, "config", None)
        config = model_config.get("quantization_config") if hasattr(model_config, "get") else None
    if config is None:
        # No quantizer: "none" only if every weight is a plain floating-point tensor.
        plain = walks.of(transformer).plain_weights
        return {"quantization": "none"} if plain else {}
    return {"quantization": _quantizer_name(config, transformer)}


def _field(config: Any, name: str) -> Any:
    """A quantization config's field, from the config object or its saved dict."""
    if isinstance(config, dict):
        return config.get(name, config.get(f"_{name}"))
    return getattr(config, name, None)


def _quantizer_name(config: Any, transformer: Any) -> str:
    method = _field(config, "quant_method")
    method = str(getattr(method, "value", method) or "unknown")
    if method == "bitsandbytes":
        if _field(config, "load_in_4bit"):
            return "bitsandbytes-4bit"
        if _field(config, "load_in_8bit"):
            return "bitsandbytes-8bit"
        return method
    if method == "gguf":
        kind = _gguf_type(transformer)
    elif method == "torchao":
        kind = _torchao_type(_field(config, "quant_type"))
    elif method == "quanto":
        kind = _field(config, "weights_dtype")
    else:  # modelopt, sdnq, auto-round, …: the first of their type fields that is set
        kind = next((value for name in ("quant_type", "weights_dtype", "bits")
                     if (value := _field(config, name)) is not None), None)
    return f"{method}-{kind}" if kind not in (None, "") else method


def _torchao_type(quant_type: Any) -> str | None:
    """``"int8wo"`` (older diffusers), an ``AOBaseConfig`` (its class name), or the saved form
    ``{"default": {"_type": "Int8WeightOnlyConfig", …}}``."""
    if quant_type is None or isinstance(quant_type, str):
        return quant_type
    if isinstance(quant_type, dict):
        inner = quant_type.get("default", quant_type)
        return str(inner.get("_type")) if isinstance(inner, dict) and "_type" in inner else None
    return type(quant_type).__name__


def _gguf_type(transformer: Any) -> str | None:
    """The GGML type holding most of the weights (a GGUF file mixes a few: Q4_K with Q6_K…)."""
    sizes: Counter[str] = Counter()
    for parameter in transformer.parameters():
        kind = getattr(parameter, "quant_type", None)
        if kind is not None:
            sizes[str(getattr(kind, "name", kind))] += parameter.numel()
    return sizes.most_common(1)[0][0] if sizes else None


def _lora(pipe: Any, walks: _Walks) -> dict[str, OptionValue]:
    names: dict[str, None] = {}  # ordered, without repeats (one adapter may span components)
    read = False
    try:
        adapters = pipe.get_list_adapters()  # diffusers' LoRA loader: {component: [names]}
    except Exception:  # no LoRA loader here, or no peft (then the loader cannot have loaded any)
        pass
    else:
        read = True
        for component_adapters in adapters.values():
            names.update(dict.fromkeys(str(name) for name in component_adapters))
    # The transformers' own peft config too: the loader misses a torch.compile-wrapped one,
    # and adapters added with peft directly (``add_adapter``) are there.
    for transformer in _transformers(pipe):
        read = True
        names.update(dict.fromkeys(str(name) for name in getattr(transformer, "peft_config",
                                                                 None) or {}))
    return {"lora_count": len(names), "lora_names": ",".join(names)} if read else {}


def _attention_backend(pipe: Any, walks: _Walks) -> dict[str, OptionValue]:
    (transformer, *_) = _transformers(pipe)
    names = dict.fromkeys(_backend_name(processor)
                          for processor in walks.of(transformer).processors)
    return {"attention_backend": "+".join(names)} if names else {}


def _backend_name(processor: Any) -> str:
    """The dispatcher backend the processor runs (its own, else a non-default global one),
    else the processor's class: the default path (PyTorch's SDPA)."""
    if hasattr(processor, "_attention_backend"):  # a processor that calls the dispatcher
        backend = processor._attention_backend or _global_backend()
        if backend is not None:
            return str(getattr(backend, "value", backend))
    return type(processor).__name__


def _global_backend() -> Any:
    """The dispatcher's active backend when it is not the default (``DIFFUSERS_ATTN_BACKEND``
    or the ``attention_backend()`` context manager chose it), else ``None``."""
    try:
        from diffusers.models.attention_dispatch import _AttentionBackendRegistry
    except ImportError:
        return None
    backend = _AttentionBackendRegistry._active_backend
    return None if str(getattr(backend, "value", backend)) == "native" else backend


def _compiled(pipe: Any, walks: _Walks) -> dict[str, OptionValue]:
    found = [module for name in _TRANSFORMERS
             if (module := getattr(pipe, name, None)) is not None]
    if not found:
        return {}
    return {"compiled": any(_is_compiled(module, walks) for module in found)}


def _is_compiled(module: Any, walks: _Walks) -> bool:
    """``torch.compile(module)`` (an ``OptimizedModule``), ``module.compile()`` or diffusers'
    ``compile_repeated_blocks()`` (regional: a compiled ``_call_impl`` on some submodule), or a
    compiled ``forward`` assigned to the module."""
    if hasattr(module, "_orig_mod"):
        return True
    if hasattr(getattr(module, "forward", None), "_torchdynamo_orig_callable"):
        return True
    return walks.of(module).compiled_child


def _vae(pipe: Any, walks: _Walks) -> dict[str, OptionValue]:
    vae = pipe.vae
    found: dict[str, OptionValue] = {}
    for key, attribute in (("vae_tiling", "use_tiling"), ("vae_slicing", "use_slicing")):
        value = getattr(vae, attribute, None)
        if isinstance(value, bool):
            found[key] = value
    return found


_PROBES: Final[tuple[Callable[[Any, _Walks], dict[str, OptionValue]], ...]] = (
    _offload, _dtype, _quantization, _lora, _attention_backend, _compiled, _vae,
)
