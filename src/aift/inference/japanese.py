"""`BaseModel` and `JapaneseModel`: one interface over the registered models and the embedded default."""

from __future__ import annotations

import abc
import logging
from typing import Any

import torch

from aift.data.conversation import PromptFormat
from aift.data.formats import default_system, resolve_format
from aift.inference.runner import GenerationSettings, LoadedModel, build_prompt, stream_answer
from aift.models import loading
from aift.models.registry import EMBEDDED_MODEL, SUPPORTED_MODELS, ModelSpec
from aift.utils.gpu import enable_activation_checkpointing, get_available_device

log = logging.getLogger(__name__)


class BaseModel(abc.ABC):
    """A model and its tokenizer, loaded on demand."""

    def __init__(self, model_name: str, device: str | None = None):
        self.model_name = model_name
        self.device = device or get_available_device()
        self.model = None
        self.tokenizer = None

    @abc.abstractmethod
    def load_model(self):
        """Loads and returns the model."""

    @abc.abstractmethod
    def load_tokenizer(self):
        """Loads and returns the tokenizer."""


class JapaneseModel(BaseModel):
    """A causal LM for (Japanese) instruction following; the embedded SmolLM2-135M-Instruct by default."""

    # "auto": the format stored with a fine-tuned folder, else the registered one, else the tokenizer's chat
    # template, else Japanese alpaca (aift.data.formats.resolve_format). Set a format name to override it.
    prompt_format: str = "auto"

    def __init__(
        self,
        model_name: str = EMBEDDED_MODEL,
        device: str | None = None,
        load_in_8bit: bool = False,
        load_in_4bit: bool = False,
        torch_dtype: torch.dtype | None = None,
        use_flash_attention: bool = True,
        gradient_checkpointing: bool = False,
        *,
        device_map: Any = None,
        max_memory: dict | None = None,
        offload_folder: str | None = None,
        trust_remote_code: bool = False,
    ):
        super().__init__(model_name, device)
        if load_in_8bit and load_in_4bit:
            raise ValueError("choose one of load_in_8bit and load_in_4bit")
        self.load_in_8bit = load_in_8bit
        self.load_in_4bit = load_in_4bit
        self.torch_dtype = torch_dtype
        self.use_flash_attention = use_flash_attention
        self.gradient_checkpointing = gradient_checkpointing
        self.device_map = device_map
        self.max_memory = max_memory
        self.offload_folder = offload_folder
        self.trust_remote_code = trust_remote_code

    @classmethod
    def list_supported_models(cls) -> dict[str, ModelSpec]:
        """The registered models, by name."""
        return dict(SUPPORTED_MODELS)

    @property
    def model_path(self) -> str:
        """The folder or hub id that from_pretrained is given."""
        return loading.resolve_model_path(self.model_name)

    def load_tokenizer(self):
        if self.tokenizer is None:
            self.tokenizer = loading.load_tokenizer(self.model_name, trust_remote_code=self.trust_remote_code)
        return self.tokenizer

    def load_model(self):
        if self.model is None:
            self.model = loading.load_causal_lm(
                self.model_name,
                device=self.device,
                dtype=self.torch_dtype,
                load_in_8bit=self.load_in_8bit,
                load_in_4bit=self.load_in_4bit,
                use_flash_attention=self.use_flash_attention,
                device_map=self.device_map,
                max_memory=self.max_memory,
                offload_folder=self.offload_folder,
                trust_remote_code=self.trust_remote_code,
            )
            if self.gradient_checkpointing:
                enable_activation_checkpointing(self.model)
        return self.model

    def load(self) -> JapaneseModel:
        """Loads tokenizer and model; returns self."""
        self.load_tokenizer()
        self.load_model()
        return self

    def load_with_fallback(self, fallback_models: list[str] | None = None) -> bool:
        """Tries this model, then each fallback in turn; logs why each failed; True when one loaded."""
        for name in [self.model_name, *(fallback_models or [])]:
            self.model_name, self.model, self.tokenizer = name, None, None
            try:
                self.load()
                log.info("loaded %s", name)
                return True
            except Exception as e:  # noqa: BLE001 - any failure means: try the next one
                log.warning("could not load %s: %s", name, e)
        self.model, self.tokenizer = None, None
        return False

    def resolved_format(self) -> PromptFormat:
        """The PromptFormat for ``self.prompt_format`` (see the class attribute)."""
        return resolve_format(self.model_name, self.load_tokenizer(), self.prompt_format)

    def build_prompt(self, instruction: str, input_text: str | None = None) -> str:
        """The generation prompt in this model's format (stored with a fine-tune, registered, or its chat template)."""
        return build_prompt(self._loaded(), [_user_message(instruction, input_text)])

    def generate_japanese(
        self,
        instruction: str,
        input_text: str | None = None,
        max_new_tokens: int = 512,
        temperature: float = 0.7,
        top_p: float = 0.9,
        top_k: int = 50,
        do_sample: bool = True,
    ) -> str:
        """Answers an instruction; returns only the answer (cut at the format's end markers, rinna <NL> -> newline)."""
        self.load_model()
        settings = GenerationSettings(max_new_tokens, temperature, top_p, top_k, greedy=not do_sample)
        return stream_answer(self._loaded(), [_user_message(instruction, input_text)], settings)

    def _loaded(self) -> LoadedModel:
        """This model as the inference runner takes it (the model itself is loaded only when generating)."""
        fmt = self.resolved_format()
        return LoadedModel(self.model, self.load_tokenizer(), fmt, self.model_name, default_system(self.model_name))


def _user_message(instruction: str, input_text: str | None) -> dict:
    return {"role": "user", "content": instruction, **({"input": input_text} if input_text else {})}
