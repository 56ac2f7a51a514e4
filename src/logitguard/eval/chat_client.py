"""One HTTP client for OpenAI-compatible chat-completions servers (vLLM, `transformers serve`, hosted APIs).

Both the endpoint judge (judge.py) and the endpoint generation engine (endpoint.py) post through it, so they
share one behaviour: requests run `concurrency` at a time, each is retried `retries` times on connection
errors, timeouts, 429 and 5xx (with exponential backoff) and fails after `timeout` seconds; a 4xx is not
retried (a bad request will not get better). The first request of a batch is sent alone, so a wrong URL or
model name fails after one request's retries, not after thousands.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

from ..errors import LogitguardError


class EndpointError(LogitguardError, RuntimeError):
    """The server could not be reached, or answered something unusable; the message says what to fix."""


class ChatClient:
    """Posts chat messages to `URL/chat/completions` (the URL as given, when it already ends so).

    `error` is the class raised (the judge raises its JudgeError), `what` names the client in messages and
    the progress bar."""

    def __init__(
        self,
        url: str,
        model: str | None = None,
        api_key: str | None = None,
        timeout: float = 60.0,
        retries: int = 3,
        concurrency: int = 8,
        backoff: float = 1.0,
        error: type[Exception] = EndpointError,
        what: str = "endpoint",
    ):
        url = url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else url + "/chat/completions"
        self.model, self.api_key = model, api_key
        self.timeout, self.retries, self.concurrency, self.backoff = timeout, retries, concurrency, backoff
        self.error, self.what = error, what

    @property
    def name(self) -> str:
        return f"endpoint:{self.url}" + (f"#{self.model}" if self.model else "")

    def _headers(self) -> dict:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def complete(self, messages: list[dict], max_tokens: int, temperature: float | None = 0) -> str:
        """The assistant message's text for one conversation; temperature None leaves sampling to the server."""
        body = {"messages": messages, "max_tokens": max_tokens}
        if temperature is not None:
            body["temperature"] = temperature
        if self.model:
            body["model"] = self.model
        try:
            return json.loads(self.post(self.url, body))["choices"][0]["message"]["content"] or ""
        except (KeyError, IndexError, TypeError, json.JSONDecodeError) as e:
            raise self.error(f"{self.url} did not answer in the chat-completions format: {e}") from e

    def post(self, url: str, body: dict) -> bytes:
        """POST `body` as JSON with the retries; the reply's bytes. A 4xx raises at once (see _refusal_message)."""
        request = urllib.request.Request(url, json.dumps(body).encode(), self._headers(), method="POST")
        last = None
        for attempt in range(self.retries + 1):
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as reply:
                    return reply.read()
            except urllib.error.HTTPError as e:
                if e.code != 429 and e.code < 500:  # a bad request will not get better by retrying
                    raise self.error(self._refusal_message(url, e.code, e.read()[:300])) from e
                last = e
            except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
                last = e
            if attempt < self.retries:
                time.sleep(self.backoff * 2**attempt)
        raise self.error(
            f"{url}: no answer after {self.retries + 1} tries (timeout {self.timeout} s): {last}; "
            f"is the {self.what} server running at that address?"
        )

    def complete_all(
        self, conversations: list[list[dict]], max_tokens: int, temperature: float | None = 0, progress: bool = True
    ) -> list[str]:
        """One answer per conversation, in order. The first goes alone (a wrong URL or model fails fast); the
        rest `concurrency` at a time, and the first failure cancels the requests not yet sent."""
        from tqdm.auto import tqdm

        if not conversations:
            return []
        bar = tqdm(total=len(conversations), desc=self.what, disable=not progress)
        try:
            answers = [self.complete(conversations[0], max_tokens, temperature)]
            bar.update()
            pool = ThreadPoolExecutor(self.concurrency)
            try:
                jobs = [pool.submit(self.complete, c, max_tokens, temperature) for c in conversations[1:]]
                for job in jobs:
                    answers.append(job.result())
                    bar.update()
            finally:
                pool.shutdown(wait=True, cancel_futures=True)  # after an error: only the requests in flight finish
        finally:
            bar.close()
        return answers

    def served_models(self) -> list[str] | None:
        """The model names the server lists at /models (None when it lists none or cannot be asked)."""
        url = self.url.removesuffix("/chat/completions") + "/models"
        request = urllib.request.Request(url, headers=self._headers())
        try:
            with urllib.request.urlopen(request, timeout=min(self.timeout, 30.0)) as reply:
                names = [m["id"] for m in json.loads(reply.read())["data"]]
        except (urllib.error.URLError, TimeoutError, ConnectionError, KeyError, TypeError, ValueError):
            return None
        return names or None

    def _refusal_message(self, url: str, code: int, body: bytes) -> str:
        """A 4xx in one line; when a chat request names a model, the names the server does serve."""
        message = f"{url} answered HTTP {code}: {' '.join(body.decode('utf-8', 'replace').split())}"
        if url != self.url or code not in (400, 404):
            return message
        served = self.served_models()
        if served and self.model not in served:
            names = ", ".join(served[:20])
            wanted = f"{self.model!r} is not among them" if self.model else "no model was named"
            message += f". The server serves {names}; {wanted}: write endpoint:URL#NAME with one of these"
        elif self.model:
            message += "; check the model name after '#' in endpoint:URL#NAME (the server's /v1/models lists them)"
        return message
