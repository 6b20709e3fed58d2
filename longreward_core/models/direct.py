"""The direct route: requests to an OpenAI-compatible server through the OpenAI SDK, not litellm.

litellm spends ~8 ms of CPU on every request (building its logging object, computing the cost
twice, filling hidden parameters); the OpenAI SDK alone ~3 ms. For a plain `openai/<served-name>`
model at an `api_base` (vLLM, `transformers serve`, a judge double) litellm adds nothing the
client needs: the request body is the same, and so is the answer. `LLMClient` sends such models
here and everything else through litellm. What stays the same:

- the model string (`openai/<name>`: the server is asked for `<name>`, slashes and all, as vLLM
  and `transformers serve` name a model by its path), the API key (the one `models.secrets`
  resolves, the keyless placeholder included, else $OPENAI_API_KEY, as litellm reads it);
- the errors: an HTTP error keeps its `status_code` and its response headers (Retry-After), a
  connection failure or timeout is an `openai.APIConnectionError` (transient, like litellm's),
  and an unreadable answer body becomes `UnreadableResponse` (HTTP 502, transient);
- the cost: litellm's price table (`litellm.get_model_info`), read once per model, priced as
  litellm prices an OpenAI usage (cached prompt tokens at the cache-read price); a model with
  tiered prices is priced by litellm itself.

Models litellm rewrites requests for (the o-series and GPT-5 families, whose `max_tokens` and
`temperature` it translates) stay on the litellm route.
"""

from __future__ import annotations

import asyncio
import functools
import importlib.util
import json
import os
import re
import sys
import weakref
from pathlib import Path
from collections.abc import AsyncGenerator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import openai

# Served names whose requests litellm translates (max_tokens -> max_completion_tokens, no temperature).
_TRANSLATED = re.compile(r"^(o\d|gpt-5)", re.IGNORECASE)
PREFIX = "openai/"


def direct_model(model: str, api_base: str | None, api_key: str | None) -> str | None:
    """The served name to ask a server for directly, or None when the request goes through litellm."""
    if not api_base or not model.startswith(PREFIX) or not (api_key or os.environ.get("OPENAI_API_KEY")):
        return None
    served = model[len(PREFIX):]
    return None if _TRANSLATED.match(served) else served


class UnreadableResponse(RuntimeError):
    """The server answered 200 with a body that is not a completion (truncated or not JSON): a
    transient fault, reported as HTTP 502 as a gateway would."""

    status_code = 502


# One SDK client (one connection pool) per event loop, server and key, shared by every LLMClient
# of that loop; it is closed when the loop shuts its async generators down (asyncio.run does).
_clients: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, dict[tuple[str, str], "openai.AsyncOpenAI"]] = (
    weakref.WeakKeyDictionary()
)
_keepers: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, list[AsyncGenerator[None, None]]] = (
    weakref.WeakKeyDictionary()
)


async def _closed_with_the_loop(clients: dict[tuple[str, str], openai.AsyncOpenAI]) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        for client in list(clients.values()):
            await client.close()
        clients.clear()


async def sdk_client(api_base: str, api_key: str) -> openai.AsyncOpenAI:
    """The running loop's OpenAI SDK client for this server and key (made on first use; the SDK
    is imported then, not with this module)."""
    import openai

    loop = asyncio.get_running_loop()
    clients = _clients.get(loop)
    if clients is None:
        clients = _clients[loop] = {}
        keeper = _closed_with_the_loop(clients)
        _keepers[loop] = [keeper]
        await keeper.__anext__()  # started in the loop: the loop finalizes it at shutdown
    client = clients.get((api_base, api_key))
    if client is None:
        # The SDK's default HTTP client, made here: the SDK's own would, when collected after its
        # loop closed, schedule its closing on whichever loop runs then (and fail there).
        client = clients[(api_base, api_key)] = openai.AsyncOpenAI(
            api_key=api_key, base_url=api_base, max_retries=0, http_client=openai.DefaultAsyncHttpxClient(),
        )
    return client


def model_prices(model: str, served: str) -> dict[str, Any] | None:
    """litellm's price entry for `openai/<served>`: from litellm itself once it is imported (it
    then also knows models registered at run time), else from the price table it ships, read
    without importing litellm (as litellm reads it with LITELLM_LOCAL_MODEL_COST_MAP=True)."""
    if "litellm" in sys.modules or os.environ.get("LITELLM_LOCAL_MODEL_COST_MAP", "").lower() != "true":
        import litellm

        try:
            return dict(litellm.get_model_info(model))
        except Exception:  # litellm knows no price for this model: cost is reported as 0
            return None
    return shipped_prices(model, served)


def shipped_prices(model: str, served: str) -> dict[str, Any] | None:
    """The entry of `openai/<served>` in the price table shipped with litellm (None: not there)."""
    table = _bundled_prices()
    for name in (model, served):
        entry = table.get(name)
        if entry and entry.get("litellm_provider") == "openai":
            return entry
    return None


@functools.cache
def _bundled_prices() -> dict[str, Any]:
    spec = importlib.util.find_spec("litellm")
    folder = Path(spec.origin).parent if spec and spec.origin else None
    if folder is None or not (folder / _PRICE_FILE).exists():
        return {}
    return json.loads((folder / _PRICE_FILE).read_text(encoding="utf-8"))


_PRICE_FILE = "model_prices_and_context_window_backup.json"


class DirectRoute:
    """Requests for one model at one server, with one key and timeout."""

    def __init__(self, model: str, served: str, api_base: str, api_key: str | None, timeout_s: float):
        self.model, self.served = model, served
        self._api_base, self._timeout_s = api_base, timeout_s
        self._api_key = api_key or os.environ.get("OPENAI_API_KEY") or ""
        self._prices: dict[str, Any] | None | bool = False  # False: not read yet; None: no price known

    async def send(self, messages: list[dict[str, Any]], params: dict[str, Any], raw_prompt: bool) -> Any:
        """The server's response (choices and usage as the OpenAI SDK reads them)."""
        client = await sdk_client(self._api_base, self._api_key)
        import openai

        from openai.types import Completion
        from openai.types.chat import ChatCompletion

        # The body goes as it is (as litellm sends it): the SDK's typed `create` would first walk
        # every message through its TypedDict transform, a sixth of the route's CPU, to the same JSON.
        if raw_prompt:
            path, body, answer = "/completions", {"model": self.served, "prompt": messages[0]["content"]}, Completion
        else:
            path, body, answer = "/chat/completions", {"model": self.served, "messages": messages}, ChatCompletion
        try:
            return await client.post(path, cast_to=answer, body={**body, **params}, options={"timeout": self._timeout_s})
        except (openai.APIResponseValidationError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise UnreadableResponse(f"unreadable answer body: {exc}") from None

    def cost(self, response: Any) -> float:
        """The response's cost in USD from litellm's price table (0 for a model it has no price for)."""
        usage = getattr(response, "usage", None)
        if usage is None:
            return 0.0
        prices = self._price_table()
        if prices is None:
            return 0.0
        prompt = int(getattr(usage, "prompt_tokens", 0) or 0)
        completion = int(getattr(usage, "completion_tokens", 0) or 0)
        details = getattr(usage, "prompt_tokens_details", None)
        cached = int(getattr(details, "cached_tokens", 0) or 0) if details is not None else 0
        if prices.get("tiered"):
            return self._litellm_cost(prompt, completion, cached)
        return (
            (prompt - cached) * prices["input"] + cached * prices["cache_read"] + completion * prices["output"]
        )

    def _price_table(self) -> dict[str, Any] | None:
        if self._prices is False:
            info = model_prices(self.model, self.served)
            if not info or info.get("input_cost_per_token") is None:
                self._prices = None
            else:
                input_cost = float(info.get("input_cost_per_token") or 0.0)
                cache_read = info.get("cache_read_input_token_cost")
                self._prices = {
                    "input": input_cost,
                    "cache_read": input_cost if cache_read is None else float(cache_read),
                    "output": float(info.get("output_cost_per_token") or 0.0),
                    "tiered": any("above" in k and v for k, v in info.items()),
                }
        return self._prices  # type: ignore[return-value]

    def _litellm_cost(self, prompt: int, completion: int, cached: int) -> float:
        import litellm

        try:
            usage = litellm.Usage(
                prompt_tokens=prompt, completion_tokens=completion, total_tokens=prompt + completion,
                prompt_tokens_details={"cached_tokens": cached},
            )
            input_cost, output_cost = litellm.cost_per_token(model=self.model, usage_object=usage)
            return float(input_cost + output_cost)
        except Exception:
            return 0.0
