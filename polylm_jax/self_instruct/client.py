"""A minimal client for OpenAI-compatible chat endpoints (OpenAI, vLLM's server on an export, ...):
POST <base_url>/chat/completions, retries with exponential backoff and jitter on 429, 5xx and
connection errors, a timeout per request. Standard library only."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import time
import urllib.error
import urllib.request


class MalformedResponse(ValueError):
  pass


class RequestFailed(RuntimeError):
  pass


@dataclasses.dataclass
class ChatClient:
  base_url: str  # e.g. http://localhost:8000/v1
  model: str
  api_key: str | None = None
  timeout_s: float = 120.0
  max_retries: int = 5
  backoff_s: float = 1.0
  max_backoff_s: float = 30.0
  temperature: float = 1.0
  top_p: float = 1.0
  max_tokens: int = 1024

  def __post_init__(self):
    self.retries = 0  # retried attempts so far (for the report)

  def complete(self, prompt: str) -> str:
    """The assistant message's text; MalformedResponse for a 200 whose body is not a chat
    completion; RequestFailed after the retries."""
    body = json.dumps(
      {
        "model": self.model,
        "messages": [{"role": "user", "content": prompt}],
        "temperature": self.temperature,
        "top_p": self.top_p,
        "max_tokens": self.max_tokens,
      }
    ).encode()
    headers = {"Content-Type": "application/json"}
    if self.api_key:
      headers["Authorization"] = f"Bearer {self.api_key}"
    url = self.base_url.rstrip("/") + "/chat/completions"
    for attempt in range(self.max_retries + 1):
      try:
        request = urllib.request.Request(url, data=body, headers=headers, method="POST")
        with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
          raw = response.read()
        break
      except urllib.error.HTTPError as e:
        if e.code != 429 and e.code < 500:
          raise RequestFailed(f"{url}: HTTP {e.code} {e.reason}") from e
        error = f"HTTP {e.code}"
      except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        error = f"{type(e).__name__}: {e}"
      if attempt == self.max_retries:
        raise RequestFailed(f"{url}: gave up after {attempt + 1} attempts ({error})")
      self.retries += 1
      delay = min(self.max_backoff_s, self.backoff_s * 2**attempt) * (0.5 + random.random())
      logging.info("self-instruct: %s, retrying in %.1f s", error, delay)
      time.sleep(delay)
    try:
      return json.loads(raw)["choices"][0]["message"]["content"]
    except (ValueError, KeyError, IndexError, TypeError) as e:
      raise MalformedResponse(f"{url}: not a chat completion ({type(e).__name__})") from e
