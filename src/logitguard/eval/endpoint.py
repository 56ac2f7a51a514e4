"""The endpoint generation engine: an OpenAI-compatible server (vLLM, `transformers serve`) generates in the
model's place during evaluation (`logitguard eval --engine endpoint:URL[#MODEL]`, experiment key `eval.engine`).

Only generation moves to the server: safety responses (keyword ASR, judge HRR, over-refusal), exact match,
HumanEval, GSM8K and commonsense in generate mode. Multiple-choice scoring (commonsense loglik, HellaSwag,
TruthfulQA) and held-out loss need the model's log-probabilities and stay in-process; when an evaluation asks
for none of them, the model is not loaded at all.

Each prompt becomes one chat-completions request with the messages logitguard builds (a user string becomes
[{"role": "user", ...}]); the server applies the model's chat template. Greedy decoding is temperature 0,
and max_tokens is max_new_tokens. The HTTP side (concurrency, retries, timeouts) is chat_client.ChatClient,
the same client as the endpoint judge's.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path

from ..errors import ConfigError
from .chat_client import ChatClient, EndpointError

API_KEY_VARIABLE = "LOGITGUARD_ENGINE_API_KEY"  # sent as a bearer token (vLLM's --api-key)
TIMEOUT = 600.0  # seconds per request: a 512-token answer from a server busy with hundreds of others
# scored from log-probabilities, which a chat-completions server does not return: always in-process
MULTIPLE_CHOICE_UTILITY = ("hellaswag", "truthfulqa")


class EndpointGenerator:
    """Stands in for the model in `generate_responses`: one chat-completions request per prompt, `batch_size`
    of them in flight at a time."""

    def __init__(
        self,
        url: str,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = TIMEOUT,
        retries: int = 3,
        backoff: float = 1.0,
    ):
        self.client = ChatClient(url, model, api_key, timeout, retries, 16, backoff, EndpointError, "generate")
        self.name = self.client.name

    def generate(
        self, prompts: list, max_new_tokens: int, batch_size: int = 16, greedy: bool = True, progress: bool = True
    ) -> list[str]:
        """One response per prompt (a user string or a messages list), stripped as the in-process path strips."""
        self.client.concurrency = batch_size
        temperature = 0 if greedy else None  # None: the server's own sampling settings
        answers = self.client.complete_all([_messages(p) for p in prompts], max_new_tokens, temperature, progress)
        return [a.strip() for a in answers]

    @contextmanager
    def adapter(self, path: str) -> Iterator[str]:
        """Generate with the PEFT adapter folder `path` inside this block: loaded into the server through vLLM's
        runtime LoRA API (POST /v1/load_lora_adapter; the server needs --enable-lora and
        VLLM_ALLOW_RUNTIME_LORA_UPDATING=True, and must read `path`), named after its weights' hash so a
        retrained adapter is never confused with the old one, and unloaded afterwards."""
        from ..files import file_sha256

        weights = Path(path) / "adapter_model.safetensors"
        if not weights.is_file():
            from ..models import ModelLoadError

            raise ModelLoadError(f"{path} holds no adapter_model.safetensors; expected a PEFT adapter folder")
        name = "logitguard-" + file_sha256(weights)[:16]
        base = self.client.url.removesuffix("/chat/completions")
        try:
            self.client.post(base + "/load_lora_adapter", {"lora_name": name, "lora_path": str(Path(path).resolve())})
        except EndpointError as e:
            if "already" not in str(e):  # vLLM's answer when these very weights are loaded: use them
                raise EndpointError(
                    f"{e}. The engine loads each run's adapter at run time: start vLLM with --enable-lora, --max-lora-"
                    "rank >= the adapter's rank and VLLM_ALLOW_RUNTIME_LORA_UPDATING=True (docs/endpoint.md)"
                ) from None
        served, self.client.model = self.client.model, name
        try:
            yield name
        finally:
            self.client.model = served
            try:  # frees the server's LoRA slot; a failure here must not hide the evaluation's own outcome
                self.client.post(base + "/unload_lora_adapter", {"lora_name": name})
            except EndpointError:
                pass


def _messages(prompt: str | list[dict]) -> list[dict]:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt


def parse_engine(spec: str | None) -> EndpointGenerator | None:
    """None (generate in-process with transformers) or 'endpoint:URL[#MODEL]'; the API key, if the server
    wants one, from $LOGITGUARD_ENGINE_API_KEY."""
    if spec is None:
        return None
    kind, _, target = spec.partition(":")
    url, _, model = target.partition("#")
    if kind != "endpoint" or not url.startswith(("http://", "https://")):
        raise ConfigError(
            f"engine {spec!r}: expected endpoint:URL[#MODEL], e.g. endpoint:http://localhost:8000/v1#my-adapter "
            "(leave the engine out to generate in-process)"
        )
    return EndpointGenerator(url, model or None, os.environ.get(API_KEY_VARIABLE))


def in_process_parts(loss_data: str | None = None, commonsense: str | None = None, utility=None) -> list[str]:
    """The parts of an evaluation that need the model loaded in-process even with an engine (empty: the
    engine does everything and the model is never loaded)."""
    from .datasets import parse_spec
    from .utility_suite import parse_utility

    parts = ["held-out loss"] if loss_data else []
    if commonsense:  # loglik mode scores in-process; generate mode sends its generations to the engine but
        parts.append("commonsense")  # reads the tokenizer's chat template, so the model is loaded either way
    parts += [parse_spec(s)[0] for s in parse_utility(utility) if parse_spec(s)[0] in MULTIPLE_CHOICE_UTILITY]
    return parts


_ACTIVE: ContextVar[EndpointGenerator | None] = ContextVar("logitguard_generation_engine", default=None)


@contextmanager
def generation_engine(engine: EndpointGenerator | None) -> Iterator[EndpointGenerator | None]:
    """Inside this block every `generate_responses` call goes to `engine` (None: in-process, as outside), so
    a caller that holds the model for multiple-choice scoring still sends its generation to the server."""
    token = _ACTIVE.set(engine)
    try:
        yield engine
    finally:
        _ACTIVE.reset(token)


def engine_for(model) -> EndpointGenerator | None:
    """What answers in `model`'s place: the model itself when it is an engine, else the engine of the enclosing
    `generation_engine` block, else None (the model generates)."""
    return model if isinstance(model, EndpointGenerator) else _ACTIVE.get()
