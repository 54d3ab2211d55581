"""A teacher behind an OpenAI-compatible completions server (vLLM, llama.cpp's server, llama-cpp-python, SGLang).

hf_interop writes no server and no scheduler: the engine serves, :class:`ServedTeacher` asks it for the top-k
log-probabilities of every position of a row (vLLM's `prompt_logprobs`, or OpenAI's `echo` + `logprobs`), many
rows in flight at once, with timeouts and retries, and turns the answers into the rows of a teacher-logits cache.
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import numpy as np

from ...logging_utils import get_logger
from .responses import (
    ServedTeacherAnswerError,
    parse_echo_logprobs,
    parse_vllm_prompt_logprobs,
    prompt_token_count,
)
from .tokens import TokenStringTable

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = get_logger(__name__)

#: The environment variable read for the API key when none is given.
DEFAULT_API_KEY_ENV = "OPENAI_API_KEY"
#: Sent by the start-up checks: ordinary tokens for any tokenizer, and predictable enough that a trained model's
#: answer tells which position each distribution belongs to (short: some servers take ~0.2 s per prompt token).
PROBE_TEXT = "The capital of France is Paris. One, two, three, four, five, six, seven."
_RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class ServedTeacherError(RuntimeError):
    """The served teacher cannot be used: unreachable, misconfigured, or it keeps failing. Names the URL and the fix."""


class _RetriesExhausted(ServedTeacherError):
    """A request failed on every try (connection errors, timeouts, 429/5xx); `last_error` says how the last one did."""

    def __init__(self, message: str, last_error: str) -> None:
        super().__init__(message)
        self.last_error = last_error


def is_teacher_url(value: Any) -> bool:
    """Whether `value` names a served teacher (`http://...` / `https://...`)."""
    return isinstance(value, str) and value.startswith(("http://", "https://"))


def is_served_teacher(teacher: Any) -> bool:
    """Whether `teacher` is a served teacher: a `ServedTeacher` or a URL."""
    return isinstance(teacher, ServedTeacher) or is_teacher_url(teacher)


def _api_base(url: str) -> str:
    """`http://host:port/v1` from `http://host:port`, `.../v1` or `.../v1/`."""
    parsed = urlparse(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ServedTeacherError(
            f"teacher URL {url!r} is not an http(s) URL; give the server's base URL, e.g. http://127.0.0.1:8000/v1."
        )
    base = url.rstrip("/")
    return base if base.endswith("/v1") else base + "/v1"


class ServedTeacher:
    """A teacher served by an OpenAI-compatible completions endpoint.

    Args:
        base_url (`str`):
            The server, e.g. `http://127.0.0.1:8000/v1` (`/v1` is added when missing).
        model (`str`, *optional*):
            The served model's name; defaults to the only (or first) model `/v1/models` lists.
        top_k (`int`, *optional*, defaults to 64):
            Log-probabilities asked per position (vLLM caps it at its `--max-logprobs`, 20 by default).
        concurrency (`int`, *optional*, defaults to 4):
            Requests in flight at once (one row per request). Servers that run one request at a time
            (llama-cpp-python) still gain from 2: the next request waits in the server while the client parses.
        timeout (`float`, *optional*, defaults to 300):
            Seconds one request may take before it counts as failed (and is retried).
        max_retries (`int`, *optional*, defaults to 4):
            Retries of a request after a connection error, a timeout, 429 or 5xx, with exponential backoff
            (`retry_backoff * 2**attempt` seconds, jittered; a `Retry-After` header wins).
        retry_backoff (`float`, *optional*, defaults to 0.5):
            First backoff in seconds.
        api_key (`str`, *optional*):
            Sent as `Authorization: Bearer ...`; defaults to the environment variable `api_key_env`.
        api_key_env (`str`, *optional*, defaults to `"OPENAI_API_KEY"`):
            Where to read the API key from when `api_key` is not given.
        api (`str`, *optional*, defaults to `"auto"`):
            `"vllm"` (token-id prompts, `prompt_logprobs`), `"echo"` (text prompts, `echo` + `logprobs`: llama.cpp
            servers and other OpenAI-compatible ones) or `"auto"` (vLLM when `/v1/models` says `owned_by: vllm`).
        position_convention (`str`, *optional*, defaults to `"auto"`):
            For `api="echo"`: whether `top_logprobs[j]` predicted token `j` (`"current"`) or follows it (`"next"`,
            llama-cpp-python for models without a BOS token); `"auto"` tells them apart on the probe text.
    """

    def __init__(
        self,
        base_url: str,
        model: str | None = None,
        top_k: int = 64,
        concurrency: int = 4,
        timeout: float = 300.0,
        max_retries: int = 4,
        retry_backoff: float = 0.5,
        api_key: str | None = None,
        api_key_env: str = DEFAULT_API_KEY_ENV,
        api: str = "auto",
        position_convention: str = "auto",
    ) -> None:
        self.url = _api_base(base_url)
        for name, value, low in (
            ("top_k", top_k, 1),
            ("concurrency", concurrency, 1),
            ("max_retries", max_retries, 0),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
        for name, value in (("timeout", timeout), ("retry_backoff", retry_backoff)):
            if (
                not isinstance(value, (int, float))
                or not math.isfinite(value)
                or value < 0
                or (name == "timeout" and value == 0)
            ):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}.")
        if api not in ("auto", "vllm", "echo"):
            raise ValueError(f"api must be 'auto', 'vllm' or 'echo', got {api!r}.")
        if position_convention not in ("auto", "current", "next"):
            raise ValueError(f"position_convention must be 'auto', 'current' or 'next', got {position_convention!r}.")
        self.model = model
        self.top_k = top_k
        self.concurrency = concurrency
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.retry_backoff = float(retry_backoff)
        self.api_key_env = api_key_env
        self.api_key = api_key if api_key is not None else os.environ.get(api_key_env) or None
        self.api = api
        self.position_convention = position_convention
        self.table: TokenStringTable | None = None
        # True when checked against a teacher tokenizer that differs from the student's (cross-tokenizer KD)
        self.cross_tokenizer = False
        self.tokenizer: PreTrainedTokenizerBase | None = None
        self.vocab_size: int | None = None
        self.model_info: dict[str, Any] = {}
        self.statistics = {
            "requests": 0,
            "submitted": 0,
            "retries": 0,
            "missing_positions": 0,
            "dropped_entries": 0,
            "tokens": 0,
        }
        self._statistics_lock = threading.Lock()
        self._local = threading.local()
        self._executor: ThreadPoolExecutor | None = None
        self._executor_pid = os.getpid()

    def __repr__(self) -> str:
        return f"ServedTeacher(url={self.url!r}, model={self.model!r}, top_k={self.top_k}, api={self.api!r})"

    # ------------------------------------------------------------------ HTTP

    def _session(self) -> Any:
        import requests

        session = getattr(self._local, "session", None)
        if session is None:
            session = requests.Session()
            self._local.session = session
        return session

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        return headers

    def _request(self, method: str, path: str, payload: dict | None = None, retries: int | None = None) -> Any:
        """The JSON answer of one request, retried on connection errors, timeouts, 429 and 5xx. `path` is relative to
        the `/v1` base, or to the server's root when it starts with `//` (vLLM's `/tokenize`)."""
        import requests

        retries = self.max_retries if retries is None else retries
        url = self.url[: -len("/v1")] + path[1:] if path.startswith("//") else self.url + path
        last_error = ""
        for attempt in range(retries + 1):
            if attempt:
                with self._statistics_lock:
                    self.statistics["retries"] += 1
            try:
                response = self._session().request(
                    method, url, json=payload, headers=self._headers(), timeout=self.timeout
                )
            except requests.RequestException as error:
                last_error = f"{type(error).__name__}: {error}"
                self._sleep_before_retry(attempt, None)
                continue
            if response.status_code in (401, 403):
                raise ServedTeacherError(self._auth_message(response.status_code))
            if response.status_code in _RETRY_STATUS:
                last_error = f"HTTP {response.status_code}: {response.text[:300]}"
                self._sleep_before_retry(attempt, response.headers.get("Retry-After"))
                continue
            if response.status_code >= 400:
                raise _ClientError(response.status_code, response.text[:1000])
            try:
                return response.json()
            except ValueError:
                last_error = f"HTTP {response.status_code} with a body that is not JSON: {response.text[:200]!r}"
                self._sleep_before_retry(attempt, None)
        raise _RetriesExhausted(
            f"the teacher server at {self.url} failed {retries + 1} time(s) on {method} {path}: {last_error}. Check "
            "that the server is running and healthy (its log), or raise timeout / max_retries; finished work is "
            "kept (a cache capture resumes when rerun with the same arguments).",
            last_error,
        )

    def _sleep_before_retry(self, attempt: int, retry_after: str | None) -> None:
        if attempt >= self.max_retries:
            return
        delay = self.retry_backoff * (2**attempt) * (0.75 + 0.5 * random.random())
        if retry_after is not None:
            try:
                delay = max(delay, float(retry_after))
            except ValueError:
                pass
        time.sleep(min(delay, 60.0))

    def _auth_message(self, status: int) -> str:
        if self.api_key:
            return (
                f"the teacher server at {self.url} rejected the API key (HTTP {status}); set the right key in "
                f"${self.api_key_env} or pass api_key=..."
            )
        return (
            f"the teacher server at {self.url} asks for an API key (HTTP {status}) and none was given; set "
            f"${self.api_key_env} (or pass api_key=... / --teacher_api_key_env NAME)."
        )

    # ------------------------------------------------------------------ start-up checks

    def connect(self, tokenizer: PreTrainedTokenizerBase) -> ServedTeacher:
        """Check, before any capture or training: the server answers, serves `model`, returns enough prompt
        log-probabilities, and tokenises like `tokenizer` (the student's). Returns `self`.

        Raises:
            ServedTeacherError: unreachable URL, missing or wrong API key, unknown model, no log-probability
                support, `top_k` above the server's limit, or a different tokenizer (the message names the URL,
                the value and the fix).
        """
        if tokenizer is None:
            raise ValueError(
                "a served teacher needs the student's tokenizer (processing_class / tokenizer=...) to match the "
                "server's tokens to ids."
            )
        self.tokenizer = tokenizer
        self.table = TokenStringTable(tokenizer)
        self.vocab_size = len(self.table)
        if self.top_k > self.vocab_size:
            raise ValueError(
                f"top_k={self.top_k} is larger than the vocabulary ({self.vocab_size}); use top_k <= {self.vocab_size}."
            )
        self._check_model()
        self._check_probe()
        return self

    def _check_model(self) -> None:
        try:
            answer = self._request("GET", "/models", retries=min(self.max_retries, 1))
        except _RetriesExhausted as error:
            raise ServedTeacherError(
                f"cannot reach the teacher server at {self.url} ({error.last_error}). Start the server (e.g. "
                "`python -m llama_cpp.server --model teacher.gguf --logits_all true` or `vllm serve MODEL "
                "--max-logprobs 64`) or fix the URL (--teacher_url)."
            ) from None
        except _ClientError as error:
            raise ServedTeacherError(
                f"the server at {self.url} has no OpenAI-compatible /v1/models (HTTP {error.status}); give the base "
                "URL of an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1."
            ) from None
        models = [item for item in (answer or {}).get("data", []) if isinstance(item, dict)]
        names = [str(item.get("id")) for item in models]
        if not models:
            raise ServedTeacherError(f"the server at {self.url} lists no model at /v1/models; is it still loading?")
        if self.model is None:
            self.model = names[0]
            if len(names) > 1:
                logger.warning(f"{self.url} serves {names}; using {self.model!r} (pass model=... to choose).")
        elif self.model not in names:
            raise ServedTeacherError(
                f"model {self.model!r} is not served at {self.url}; it serves {names}. Pass one of them as the "
                "served model name (--teacher_served_model)."
            )
        info = models[names.index(self.model)]
        self.model_info = {
            "url": self.url,
            "model": self.model,
            "owned_by": info.get("owned_by"),
            # vLLM reports the checkpoint it loaded as `root`; other servers may report a revision
            "revision": info.get("revision") or info.get("root"),
        }
        if self.api == "auto":
            self.api = "vllm" if str(info.get("owned_by", "")).lower() == "vllm" else "echo"

    def _check_probe(self) -> None:
        ids = self.tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"]
        try:
            if self.api == "vllm":
                self._check_vllm_tokenizer(ids)
                choice = self._complete_vllm(ids)
                self._check_vllm_tokens(choice, ids)
            else:
                choice, prompt_chars = self._complete_echo(ids)
                self._check_echo_tokens(choice, ids, prompt_chars)
                if self.position_convention == "auto":
                    self.position_convention = _detect_convention(choice, prompt_chars)
                    logger.info(f"{self.url}: top_logprobs[j] follows token j's {self.position_convention!r} position")
                parse_echo_logprobs(choice, ids, self.table, self.top_k, self.position_convention, prompt_chars)
        except ServedTeacherAnswerError as error:
            raise ServedTeacherError(f"the probe request to {self.url} gave an unusable answer: {error}.") from None

    def _check_vllm_tokenizer(self, ids: list[int]) -> None:
        """vLLM's `/tokenize` on the probe text must give the student's ids (skipped when the server has none)."""
        payload = {"model": self.model, "prompt": PROBE_TEXT, "add_special_tokens": False}
        try:
            answer = self._request("POST", "//tokenize", payload, retries=min(self.max_retries, 1))
        except _ClientError:
            return  # no /tokenize: the decoded tokens of the probe answer are compared instead
        theirs = [int(token) for token in (answer or {}).get("tokens", [])]
        if theirs != ids:
            position = next((i for i, (a, b) in enumerate(zip(ids, theirs, strict=False)) if a != b), len(ids))
            strings = self.table.row_strings(ids)
            ours_at = strings[position] if position < len(ids) else "<end>"
            theirs_at = f"id {theirs[position]}" if position < len(theirs) else "<end>"
            raise ServedTeacherError(_tokenizer_mismatch(self.url, ours_at, theirs_at, position))

    def _check_vllm_tokens(self, choice: dict, ids: list[int]) -> None:
        prompt_logprobs = choice.get("prompt_logprobs")
        if not isinstance(prompt_logprobs, list):
            raise ServedTeacherError(
                f"the server at {self.url} ignored prompt_logprobs (answer keys {sorted(choice)}); it is not vLLM. "
                "Use api='echo' for other OpenAI-compatible servers."
            )
        strings = self.table.row_strings(ids)
        for position in range(1, min(len(ids), len(prompt_logprobs))):
            entry = (prompt_logprobs[position] or {}).get(str(ids[position]))
            decoded = entry.get("decoded_token") if isinstance(entry, dict) else None
            if decoded is not None and decoded != strings[position] and strings[position]:
                raise ServedTeacherError(_tokenizer_mismatch(self.url, strings[position], decoded, position))
        parse_vllm_prompt_logprobs(choice, ids, self.top_k, self.vocab_size, where="probe")

    def _check_echo_tokens(self, choice: dict, ids: list[int], prompt_chars: int) -> None:
        logprobs = choice.get("logprobs") or {}
        if not logprobs.get("top_logprobs"):
            raise ServedTeacherError(
                f"the server at {self.url} returned no prompt log-probabilities for echo=True, logprobs={self.top_k}; "
                "start llama-cpp-python with --logits_all true (llama.cpp servers need logprob support), or use a "
                "vLLM server (api='vllm')."
            )
        server = list(logprobs.get("tokens") or [])
        server = server[: prompt_token_count(server, prompt_chars)]
        ours = self.table.row_strings(ids)
        if server != ours:
            position = next(
                (i for i, (a, b) in enumerate(zip(ours, server, strict=False)) if a != b), min(len(ours), len(server))
            )
            ours_at = ours[position] if position < len(ours) else "<end>"
            server_at = server[position] if position < len(server) else "<end>"
            raise ServedTeacherError(_tokenizer_mismatch(self.url, ours_at, server_at, position))
        widths = [len(entry) for entry in logprobs["top_logprobs"] if entry]
        if widths and max(widths) < min(self.top_k, self.vocab_size):
            raise ServedTeacherError(
                f"the server at {self.url} returns at most {max(widths)} log-probabilities per position, fewer than "
                f"top_k={self.top_k}; lower top_k to {max(widths)} or raise the server's limit."
            )

    # ------------------------------------------------------------------ one row

    def _complete_vllm(self, ids: list[int]) -> dict:
        payload = {
            "model": self.model,
            "prompt": [int(token_id) for token_id in ids],
            "max_tokens": 1,
            "temperature": 0.0,
            "prompt_logprobs": self.top_k,
        }
        return self._choice(payload)

    def _complete_echo(self, ids: list[int]) -> tuple[dict, int]:
        text = self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        payload = {
            "model": self.model,
            "prompt": text,
            "max_tokens": 1,
            "temperature": 0.0,
            "echo": True,
            "logprobs": self.top_k,
        }
        answer_choice = self._choice(payload)
        return answer_choice, len(text)

    def _choice(self, payload: dict) -> dict:
        try:
            answer = self._request("POST", "/completions", payload)
        except _ClientError as error:
            raise ServedTeacherError(self._client_error_message(error)) from None
        with self._statistics_lock:
            self.statistics["requests"] += 1
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not choices or not isinstance(choices[0], dict):
            raise ServedTeacherAnswerError(f"answer without choices from {self.url}: {str(answer)[:200]}")
        return choices[0]

    def _client_error_message(self, error: _ClientError) -> str:
        text = error.text
        lowered = text.lower()
        if "logprob" in lowered and ("max" in lowered or "greater" in lowered or "exceed" in lowered):
            return (
                f"the server at {self.url} refuses top_k={self.top_k} log-probabilities (HTTP {error.status}: "
                f"{text[:300]}); lower top_k, or start vLLM with --max-logprobs {self.top_k}."
            )
        if "model" in lowered and ("not found" in lowered or "does not exist" in lowered):
            return (
                f"the server at {self.url} does not serve model {self.model!r} (HTTP {error.status}: {text[:300]}); "
                "pass the served model's name (--teacher_served_model)."
            )
        return f"the server at {self.url} refused the request (HTTP {error.status}): {text[:500]}"

    def row_topk(self, ids: list[int] | np.ndarray, where: str = "row") -> tuple[np.ndarray, np.ndarray]:
        """The teacher's top-k for one row of token ids: `(ids (S-1, k) int64, logprobs (S-1, k) float16)`."""
        if self.table is None:
            raise RuntimeError("call connect(tokenizer) before asking the served teacher for log-probabilities.")
        ids = [int(token_id) for token_id in ids]
        if self.api == "vllm":
            choice = self._complete_vllm(ids)
            top_ids, top_logprobs, statistics = parse_vllm_prompt_logprobs(
                choice, ids, self.top_k, self.vocab_size, where=f"{self.url}, {where}"
            )
        else:
            choice, prompt_chars = self._complete_echo(ids)
            top_ids, top_logprobs, statistics = parse_echo_logprobs(
                choice,
                ids,
                self.table,
                self.top_k,
                self.position_convention,
                prompt_chars,
                where=f"{self.url}, {where}",
            )
        with self._statistics_lock:
            self.statistics["tokens"] += len(ids)
            for key in ("missing_positions", "dropped_entries"):
                self.statistics[key] += statistics.get(key, 0)
        return top_ids, top_logprobs

    # ------------------------------------------------------------------ many rows

    @property
    def executor(self) -> ThreadPoolExecutor:
        # a new pool in a forked process (data-loader workers): the parent's threads do not exist there
        if self._executor is None or self._executor_pid != os.getpid():
            self._executor = ThreadPoolExecutor(max_workers=self.concurrency, thread_name_prefix="served-teacher")
            self._executor_pid = os.getpid()
        return self._executor

    def submit(self, ids: list[int] | np.ndarray, where: str = "row") -> Future:
        """Ask for one row's top-k in the background; the future gives what :meth:`row_topk` returns."""
        with self._statistics_lock:
            self.statistics["submitted"] += 1
        return self.executor.submit(self.row_topk, ids, where)

    def iter_topk(self, rows: Iterable[tuple[str, list[int]]]) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """`row_topk` of each `(name, ids)` in order, with up to `2 * concurrency` rows asked ahead."""
        pending: deque[Future] = deque()
        window = 2 * self.concurrency
        try:
            for name, ids in rows:
                pending.append(self.submit(ids, where=name))
                if len(pending) >= window:
                    yield pending.popleft().result()
            while pending:
                yield pending.popleft().result()
        except BaseException:
            # no request outlives a failed capture (a later resume must not race a retry of this one)
            self.close(wait=True)
            raise
        finally:
            for future in pending:
                future.cancel()

    def generate(
        self,
        prompts: list[list[int]],
        max_new_tokens: int,
        temperature: float = 1.0,
        top_p: float = 1.0,
        top_k: int | None = None,
        seed: int | None = None,
    ) -> list[str]:
        """Sampled continuations (text) of token-id prompts, one request per prompt, in parallel."""
        if self.table is None:
            raise RuntimeError("call connect(tokenizer) before generating with the served model.")

        def one(index: int, prompt: list[int]) -> str:
            payload: dict[str, Any] = {
                "model": self.model,
                "max_tokens": int(max_new_tokens),
                "temperature": float(temperature),
                "top_p": float(top_p),
            }
            if self.api == "vllm":
                payload["prompt"] = [int(token_id) for token_id in prompt]
            else:
                payload["prompt"] = self.tokenizer.decode(
                    prompt, skip_special_tokens=False, clean_up_tokenization_spaces=False
                )
            if top_k:
                payload["top_k"] = int(top_k)
            if seed is not None:
                payload["seed"] = int(seed) + index
            try:
                answer = self._request("POST", "/completions", payload)
            except _ClientError as error:
                raise ServedTeacherError(self._client_error_message(error)) from None
            return str(answer["choices"][0].get("text", ""))

        futures = [self.executor.submit(one, index, prompt) for index, prompt in enumerate(prompts)]
        return [future.result() for future in futures]

    def close(self, wait: bool = False) -> None:
        """Stop the request threads (queued requests are dropped; with `wait`, running ones are awaited)."""
        if self._executor is not None:
            self._executor.shutdown(wait=wait, cancel_futures=True)
            self._executor = None

    def known_missing_positions(self) -> list[int]:
        """Positions of every row the server never answers: the first one when its echo answers follow each token
        (`top_logprobs[0]` is always `None`, and it would have held the distribution after token 0)."""
        return [0] if self.api == "echo" and self.position_convention == "next" else []

    def fingerprint(self) -> str:
        """What identifies the teacher in a cache plan: the served model's name and reported revision."""
        return f"served:{self.model_info.get('model') or self.model}@{self.model_info.get('revision') or 'unknown'}"


class _ClientError(Exception):
    """A 4xx answer other than 401/403/408/409/425/429 (not retried)."""

    def __init__(self, status: int, text: str) -> None:
        super().__init__(f"HTTP {status}: {text}")
        self.status = status
        self.text = text


def _tokenizer_mismatch(url: str, ours: str, theirs: str, position: int) -> str:
    return (
        f"the teacher served at {url} tokenises differently from the student's tokenizer (probe token {position}: "
        f"{theirs!r} from the server, {ours!r} from the student). Same-tokenizer distillation compares ids position "
        "by position; use cross-tokenizer distillation (hf_interop.CrossTokenizerDistillationTrainer, "
        "loss_type='uld'), or serve a teacher that shares the student's tokenizer."
    )


def _detect_convention(choice: dict, prompt_chars: int) -> str:
    """`"current"` or `"next"`: which reading of `top_logprobs` makes the probe text likely.

    Under the right reading, the distribution at position `j` predicts the token the text has there, so the
    probe's tokens get high log-probabilities; under the wrong one they are scored by a distribution shifted by
    one token, which gives them low ones. A token missing from a position's top-k counts as that position's
    smallest value (an upper bound). Raises when the two readings are too close to tell (an untrained model).
    """
    logprobs = choice["logprobs"]
    tokens = list(logprobs["tokens"])
    tokens = tokens[: prompt_token_count(tokens, prompt_chars)]
    top = logprobs["top_logprobs"]

    def score(shift: int) -> float:
        values = []
        for j in range(1, len(tokens)):
            answer = top[j - shift] if 0 <= j - shift < len(top) else None
            if answer:
                values.append(float(answer.get(tokens[j], min(float(value) for value in answer.values()))))
        return float(np.mean(values)) if values else 0.0

    current, following = score(0), score(1)
    if abs(current - following) < 0.5:
        raise ServedTeacherError(
            "cannot tell from the probe text whether the server's top_logprobs[j] predicted token j or follows it "
            f"(mean log-probability of the probe's tokens {current:.2f} vs {following:.2f}: an untrained model?); "
            "pass position_convention='current' (OpenAI's convention, vLLM, servers that add a BOS token) or 'next' "
            "(llama-cpp-python serving a model without BOS)."
        )
    return "current" if current > following else "next"
