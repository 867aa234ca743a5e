"""The options that change a job's speed, read from real (tiny) diffusers Wan pipelines."""

from __future__ import annotations

import importlib.util
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from inference.instrument import instrument
from inference.speed_options import SPEED_OPTION_KEYS, each_module, speed_options
from inference.tiny_models import TINY_VARIANTS, build_tiny_pipeline
from telemetry.events import JobStarted
from telemetry.log.memory import MemoryLog
from tests.inference.test_instrument import call_kwargs
from tests.telemetry.log_contract import events_of

DEFAULTS: dict[str, Any] = {
    "offload": "none", "dtype": "float32", "quantization": "none", "lora_count": 0,
    "lora_names": "", "attention_backend": "WanAttnProcessor", "compiled": False,
    "vae_tiling": False, "vae_slicing": False, "num_videos": 1,
}

HAS_PEFT = importlib.util.find_spec("peft") is not None


@pytest.fixture(name="pipe")
def _pipe() -> Any:
    """A fresh tiny Wan 2.1 T2V pipeline."""
    return build_tiny_pipeline("tiny-t2v")


class TestDetected:
    @pytest.mark.parametrize("variant", TINY_VARIANTS)
    def test_defaults(self, variant: str) -> None:
        """A pipeline as built: every key, at its default, in the documented order (the
        attention processor is the model's own default: Wan's, CogVideoX's, the UNet's)."""
        options = speed_options(build_tiny_pipeline(variant))
        processor = {"tiny-cogvideox": "CogVideoXAttnProcessor2_0",
                     "tiny-sd": "AttnProcessor2_0"}.get(variant, DEFAULTS["attention_backend"])
        assert {**DEFAULTS, "attention_backend": processor} == options
        assert SPEED_OPTION_KEYS == tuple(options)

    def test_dtype_is_the_transformers(self) -> None:
        """A bfloat16 pipeline says so."""
        assert "bfloat16" == speed_options(
            build_tiny_pipeline("tiny-t2v", dtype=torch.bfloat16))["dtype"]

    def test_vae_tiling_and_slicing(self, pipe: Any) -> None:
        """The VAE's own switches, each read on its own."""
        pipe.vae.enable_tiling()
        assert (True, False) == _vae(speed_options(pipe))
        pipe.vae.enable_slicing()
        assert (True, True) == _vae(speed_options(pipe))

    def test_torch_compile_wrapper(self, pipe: Any) -> None:
        """``torch.compile(transformer)`` is seen through its wrapper (nothing is run or
        compiled here), and the rest is read from the module it wraps."""
        pipe.transformer = torch.compile(pipe.transformer)
        assert {**DEFAULTS, "compiled": True} == speed_options(pipe)

    def test_regional_compile(self, pipe: Any) -> None:
        """diffusers' ``compile_repeated_blocks()`` compiles each block in place."""
        pipe.transformer.compile_repeated_blocks()
        assert speed_options(pipe)["compiled"] is True

    def test_compiled_second_expert(self) -> None:
        """Wan 2.2 A14B: compiling only the low-noise expert counts."""
        pipe = build_tiny_pipeline("tiny-t2v-a14b")
        pipe.transformer_2 = torch.compile(pipe.transformer_2)
        assert speed_options(pipe)["compiled"] is True

    @pytest.mark.skipif(not HAS_PEFT, reason="peft is not installed: no LoRA can be loaded "
                        "(diffusers' LoRA support needs it); install peft to run this")
    def test_lora_adapters(self, pipe: Any) -> None:
        """Adapters added through peft are counted and named, also once compiled."""
        from peft import LoraConfig

        for name in ("style", "motion"):
            pipe.transformer.add_adapter(LoraConfig(r=2, lora_alpha=2,
                                                    target_modules=["to_q", "to_k"]),
                                         adapter_name=name)
        assert (2, "style,motion") == _lora(speed_options(pipe))
        pipe.transformer = torch.compile(pipe.transformer)
        assert (2, "style,motion") == _lora(speed_options(pipe))

    @pytest.mark.parametrize(("enable", "expected"), [
        ("enable_model_cpu_offload", "model"),
        ("enable_sequential_cpu_offload", "sequential"),
    ])
    def test_accelerate_offload(self, enable: str, expected: str) -> None:
        """diffusers' offloading hooks, applied for real (onto the CPU, which they accept when
        the device is named), are told apart."""
        pipe = build_tiny_pipeline("tiny-t2v-a14b")
        getattr(pipe, enable)(device="cpu")
        assert {**DEFAULTS, "offload": expected} == speed_options(pipe)

    def test_group_offload(self, pipe: Any) -> None:
        """diffusers' group offloading, on one component, makes the pipeline's offload
        ``group``."""
        pipe.transformer.enable_group_offload(onload_device=torch.device("cpu"),
                                              offload_type="leaf_level")
        assert "group" == speed_options(pipe)["offload"]

    def test_attention_backend_set(self, pipe: Any) -> None:
        """A backend set on the transformer's processors is named instead of their class."""
        pipe.transformer.set_attention_backend("native")
        assert "native" == speed_options(pipe)["attention_backend"]

    @pytest.mark.parametrize(("config", "expected"), [
        ({"quant_method": "bitsandbytes", "_load_in_4bit": True, "_load_in_8bit": False,
          "load_in_4bit": True, "load_in_8bit": False, "bnb_4bit_quant_type": "nf4"},
         "bitsandbytes-4bit"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": False, "load_in_8bit": True},
         "bitsandbytes-8bit"),
        ({"quant_method": "torchao", "quant_type": "int8wo"}, "torchao-int8wo"),
        ({"quant_method": "torchao",
          "quant_type": {"default": {"_type": "Float8WeightOnlyConfig", "_version": 2,
                                     "_data": {}}}},
         "torchao-Float8WeightOnlyConfig"),
        ({"quant_method": "quanto", "weights_dtype": "int4"}, "quanto-int4"),
        ({"quant_method": "gguf", "compute_dtype": "bfloat16"}, "gguf"),
        ({"quant_method": "modelopt", "quant_type": "FP8"}, "modelopt-FP8"),
    ])
    def test_quantization_from_the_saved_config(self, pipe: Any, config: dict[str, Any],
                                                expected: str) -> None:
        """A pre-quantized checkpoint's ``quantization_config`` (the form diffusers saves) names
        the quantizer; the quantization libraries themselves are not installed here."""
        pipe.transformer.register_to_config(quantization_config=config)
        assert expected == speed_options(pipe)["quantization"]

    def test_quantization_config_object(self, pipe: Any) -> None:
        """The config object diffusers keeps on a quantized model's quantizer reads the same."""
        from diffusers import GGUFQuantizationConfig

        pipe.transformer.register_to_config(
            quantization_config=GGUFQuantizationConfig(compute_dtype=torch.bfloat16))
        assert "gguf" == speed_options(pipe)["quantization"]

    def test_weights_that_are_not_plain_floats_are_not_called_unquantized(
            self, pipe: Any) -> None:
        """Integer weights with no quantizer config: quantization is unknown, not "none"."""
        pipe.transformer.register_parameter(
            "packed", torch.nn.Parameter(torch.zeros(4, dtype=torch.int8), requires_grad=False))
        assert "quantization" not in speed_options(pipe)

    def test_videos_per_prompt(self, pipe: Any) -> None:
        """The call's ``num_videos_per_prompt``; ``None`` leaves the key out."""
        assert 2 == speed_options(pipe, num_videos=2)["num_videos"]
        assert "num_videos" not in speed_options(pipe, num_videos=None)


class TestNeverRaises:
    def test_not_a_pipeline(self) -> None:
        """Nothing to read: only the call's videos per prompt."""
        assert {"num_videos": 1} == speed_options(object())

    def test_attributes_that_raise(self) -> None:
        """A probe that raises leaves its keys out; the others are still read."""

        class Hostile:
            @property
            def transformer(self) -> Any:
                raise RuntimeError("no transformer here")

            @property
            def components(self) -> Any:
                raise RuntimeError("no components either")

            vae = SimpleNamespace(use_tiling=True, use_slicing="yes")  # slicing: not a bool

        assert {"vae_tiling": True, "num_videos": 3} == speed_options(Hostile(), num_videos=3)

    def test_a_pipeline_missing_parts(self, pipe: Any) -> None:
        """A real pipeline without its VAE and with its transformer replaced by a bare module:
        what can be read is, the rest is absent."""
        pipe.vae = None
        pipe.transformer = torch.nn.Linear(2, 2)
        options = speed_options(pipe, num_videos="many")  # type: ignore[arg-type]
        assert {"offload": "none", "dtype": "float32", "quantization": "none", "lora_count": 0,
                "lora_names": "", "compiled": False} == options


class TestRecordedByInstrument:
    def test_job_started_carries_the_pipelines_state_at_the_call(self) -> None:
        """What ``instrument()`` records is read when the job starts: tiling switched on after
        entering the context counts, and the call's videos per prompt are recorded."""
        pipe = build_tiny_pipeline("tiny-t2v")
        log = MemoryLog()
        with instrument(pipe, log=log, job="j"):
            pipe.vae.enable_tiling()
            output = pipe(**call_kwargs("tiny-t2v", steps=2), num_videos_per_prompt=2)
        assert 2 == len(output.frames)
        (started,) = [e for e in events_of(log.read()) if isinstance(e, JobStarted)]
        assert {**DEFAULTS, "vae_tiling": True, "num_videos": 2} == started.options

    def test_the_callers_options_win(self) -> None:
        """Options given to ``instrument()`` are kept, over what was detected."""
        pipe = build_tiny_pipeline("tiny-t2v")
        log = MemoryLog()
        with instrument(pipe, log=log, job="j", options={"offload": "custom", "tenant": "a"}):
            pipe(**call_kwargs("tiny-t2v", steps=1))
        (started,) = [e for e in events_of(log.read()) if isinstance(e, JobStarted)]
        assert {**DEFAULTS, "offload": "custom", "tenant": "a"} == started.options


def _vae(options: dict[str, Any]) -> tuple[Any, Any]:
    return options["vae_tiling"], options["vae_slicing"]


def _lora(options: dict[str, Any]) -> tuple[Any, Any]:
    return options["lora_count"], options["lora_names"]


class TestOnePass:
    """The probes read one shared pass over the modules (``each_module`` and ``__dict__``
    lookups) instead of four ``modules()`` walks through ``hasattr``: the answers must be the
    ones diffusers and torch give."""

    @pytest.mark.parametrize("variant", TINY_VARIANTS)
    def test_each_module_is_modules_in_order(self, variant: str) -> None:
        pipe = build_tiny_pipeline(variant)
        for component in pipe.components.values():
            if isinstance(component, torch.nn.Module):
                assert [id(m) for m in component.modules()] == \
                    [id(m) for m in each_module(component)]

    def test_a_shared_submodule_is_listed_once_where_modules_lists_it(self) -> None:
        shared = torch.nn.Linear(2, 2)
        root = torch.nn.Sequential(shared, torch.nn.Sequential(shared, torch.nn.ReLU()))
        assert [id(m) for m in root.modules()] == [id(m) for m in each_module(root)]

    def test_dtype_is_diffusers_compute_dtype_with_layerwise_casting(self, pipe: Any) -> None:
        """Layerwise casting stores float8 weights and computes in float32: diffusers' ``dtype``
        says float32 and so does the walk."""
        pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn,
                                                  compute_dtype=torch.float32)
        assert str(pipe.transformer.dtype).removeprefix("torch.") == \
            speed_options(pipe)["dtype"] == "float32"

    def test_dtype_skips_keep_in_fp32_modules_as_diffusers_does(self) -> None:
        pipe = build_tiny_pipeline("tiny-t2v", dtype=torch.bfloat16)
        assert str(pipe.transformer.dtype).removeprefix("torch.") == \
            speed_options(pipe)["dtype"] == "bfloat16"

    def test_a_processor_defined_by_the_class_is_seen(self, pipe: Any) -> None:
        """``processor`` as a class attribute (not in the instance's ``__dict__``)."""

        class Backend:
            _attention_backend = "flash"

        class WithProcessor(torch.nn.Module):
            processor = Backend()

        pipe.transformer.add_module("extra", WithProcessor())
        assert "WanAttnProcessor+flash" == speed_options(pipe)["attention_backend"]
