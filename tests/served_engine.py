"""A small OpenAI-compatible completions server for tests, backed by a real Transformers causal LM, on loopback.

It answers the way the engines hf_interop supports do, so the client's parsing, retries and start-up checks can be
tested fast with tiny models, and faults can be injected on demand (the real llama.cpp server is tested in
`tests/distill/test_served_teacher_llama_cpp.py`):

- `style="vllm"`: `/tokenize`, token-id prompts, `prompt_logprobs=k` answered as `[None, {token_id: {logprob, rank,
  decoded_token}}, ...]`, `/v1/models` with `owned_by: "vllm"`, and vLLM's refusal above `max_logprobs`.
- `style="echo"`: text prompts with `echo=True, logprobs=k` answered as OpenAI's legacy `logprobs` (`tokens`,
  `text_offset`, `top_logprobs` as `{token string: logprob}` with the first `None`), as llama-cpp-python does;
  `convention="next"` reproduces llama-cpp-python's answer for models without BOS (`top_logprobs[j]` is the
  distribution after token `j`).

Faults (`engine.faults`, a dict, read on every request): `status` (answer this HTTP status `status_count` times),
`delay` (seconds before answering), `short` (answer this many entries per position), `nan` / `neginf` (put NaN or
-inf into the first position's values), `drop_connection` (close the socket without answering, once per count),
`no_logprobs` (answer echo requests without log-probabilities, as a server without logprob support does).
"""

from __future__ import annotations

import json
import math
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import torch


class ServedEngine:
    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        style: str = "vllm",
        convention: str = "current",
        model_name: str = "tiny-teacher",
        api_key: str | None = None,
        max_logprobs: int = 20,
        root: str | None = None,
    ) -> None:
        from hf_interop.distill.served_teacher import TokenStringTable

        self.model = model.eval()
        self.tokenizer = tokenizer
        self.style = style
        self.convention = convention
        self.model_name = model_name
        self.api_key = api_key
        self.max_logprobs = max_logprobs
        self.root = root
        self.table = TokenStringTable(tokenizer)
        self.faults: dict[str, Any] = {}
        self.requests: list[dict] = []
        self.lock = threading.Lock()
        self.model_lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ lifecycle

    def __enter__(self) -> ServedEngine:
        engine = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:  # noqa: N802
                engine._handle(self, "GET")

            def do_POST(self) -> None:  # noqa: N802
                engine._handle(self, "POST")

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        # request threads are joined when the server closes: one still running the model (a delayed answer nobody
        # waits for any more) at interpreter exit aborts the process in torch's thread teardown
        self._server.daemon_threads = False
        self._server.block_on_close = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self._server.server_address[1]}/v1"

    # ------------------------------------------------------------------ requests

    def _take_fault(self, name: str) -> Any:
        with self.lock:
            value = self.faults.get(name)
            if value is None:
                return None
            count = self.faults.get(f"{name}_count")
            if count is not None:
                if count <= 0:
                    return None
                self.faults[f"{name}_count"] = count - 1
            return value

    def _handle(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = json.loads(handler.rfile.read(length)) if length else {}
        with self.lock:
            self.requests.append({"method": method, "path": handler.path, "body": body})
        if self._take_fault("drop_connection"):
            handler.close_connection = True
            handler.connection.shutdown(2)
            return
        delay = self.faults.get("delay")
        if delay:
            time.sleep(delay)
        if self.api_key is not None and handler.headers.get("Authorization") != f"Bearer {self.api_key}":
            return self._send(handler, 401, {"error": {"message": "invalid api key"}})
        status = self._take_fault("status")
        if status:
            return self._send(handler, int(status), {"error": {"message": f"injected {status}"}})
        if method == "GET" and handler.path.rstrip("/") == "/v1/models":
            owner = "vllm" if self.style == "vllm" else "llama-cpp"
            item = {"id": self.model_name, "owned_by": owner, **({"root": self.root} if self.root else {})}
            return self._send(handler, 200, {"object": "list", "data": [item]})
        if method == "POST" and handler.path.rstrip("/") == "/tokenize" and self.style == "vllm":
            ids = self.tokenizer(body.get("prompt", ""), add_special_tokens=bool(body.get("add_special_tokens")))
            return self._send(handler, 200, {"tokens": ids["input_ids"], "count": len(ids["input_ids"])})
        if method == "POST" and handler.path.rstrip("/") == "/v1/completions":
            try:
                return self._send(handler, *self._complete(body))
            except Exception as error:  # noqa: BLE001 - a server answers 500 on its own bugs
                return self._send(handler, 500, {"error": {"message": repr(error)}})
        return self._send(handler, 404, {"error": {"message": f"no route {method} {handler.path}"}})

    @staticmethod
    def _send(handler: BaseHTTPRequestHandler, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)

    def _complete(self, body: dict) -> tuple[int, dict]:
        if body.get("model") not in (None, self.model_name):
            return 404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}}
        prompt = body.get("prompt")
        if self.style == "vllm":
            if not isinstance(prompt, list):
                prompt = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
            ids = [int(token_id) for token_id in prompt]
        else:
            if not isinstance(prompt, str):
                return 422, {"error": {"message": "prompt must be a string"}}
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"]
        max_tokens = int(body.get("max_tokens", 16))
        text, generated = self._generate(ids, max_tokens, body) if max_tokens > 0 else ("", [])
        choice: dict[str, Any] = {"index": 0, "text": text, "finish_reason": "length"}
        k = body.get("prompt_logprobs") if self.style == "vllm" else body.get("logprobs")
        if k is not None and self.style == "vllm":
            if int(k) > self.max_logprobs:
                return 400, {
                    "error": {
                        "message": f"Requested prompt logprobs of {k}, which is greater than max allowed: "
                        f"{self.max_logprobs}"
                    }  # fmt: skip
                }
            choice["prompt_logprobs"] = self._vllm_prompt_logprobs(ids, int(k))
        elif k is not None and body.get("echo") and not self.faults.get("no_logprobs"):
            choice["logprobs"] = self._echo_logprobs(ids + generated, int(k))
            choice["text"] = prompt + text
        usage = {"prompt_tokens": len(ids), "completion_tokens": len(generated)}
        return 200, {"object": "text_completion", "model": self.model_name, "choices": [choice], "usage": usage}

    @torch.no_grad()
    def _log_probs(self, ids: list[int]) -> torch.Tensor:
        with self.model_lock:
            logits = self.model(input_ids=torch.tensor([ids])).logits[0].float()
        return torch.log_softmax(logits, dim=-1)

    @torch.no_grad()
    def _generate(self, ids: list[int], max_tokens: int, body: dict) -> tuple[str, list[int]]:
        temperature = float(body.get("temperature", 1.0))
        generator = torch.Generator().manual_seed(int(body.get("seed", 0)))
        sequence = list(ids)
        for _ in range(max_tokens):
            log_probs = self._log_probs(sequence)[-1]
            if temperature <= 0:
                token = int(log_probs.argmax())
            else:
                token = int(torch.multinomial((log_probs / temperature).softmax(-1), 1, generator=generator))
            sequence.append(token)
        generated = sequence[len(ids) :]
        return self.tokenizer.decode(generated, clean_up_tokenization_spaces=False), generated

    def _corrupt(self, values: list[float], position: int) -> list[float]:
        if position == 1 and self.faults.get("nan"):
            values[0] = math.nan
        if position == 1 and self.faults.get("neginf"):
            values[0] = -math.inf
        return values

    def _vllm_prompt_logprobs(self, ids: list[int], k: int) -> list:
        log_probs = self._log_probs(ids)
        width = int(self.faults.get("short") or k)
        answers: list = [None]
        for position in range(1, len(ids)):
            distribution = log_probs[position - 1]
            values, top = distribution.topk(width)
            entries = {int(t): float(v) for t, v in zip(top, values, strict=True)}
            entries.setdefault(ids[position], float(distribution[ids[position]]))
            ranks = {int(t): rank + 1 for rank, t in enumerate(distribution.argsort(descending=True)[: width + 1])}
            keys = list(entries)
            corrupted = self._corrupt([entries[key] for key in keys], position)
            answers.append(
                {
                    str(key): {
                        "logprob": value,
                        "rank": ranks.get(key, width + 1),
                        "decoded_token": self.table.strings[key],
                    }
                    for key, value in zip(keys, corrupted, strict=True)
                }
            )
        return answers

    def _echo_logprobs(self, ids: list[int], k: int) -> dict:
        log_probs = self._log_probs(ids)
        width = int(self.faults.get("short") or k)
        strings = self.table.row_strings(ids)
        tokens, offsets, token_logprobs, top_logprobs = [], [], [], []
        offset = 0
        for position, token_id in enumerate(ids):
            # "current": the distribution that predicted this token; "next": the one after it (llama-cpp-python, no BOS)
            index = position - 1 if self.convention == "current" else position
            tokens.append(strings[position])
            offsets.append(offset)
            offset += len(strings[position])
            if index < 0 or index >= len(ids):
                token_logprobs.append(None)
                top_logprobs.append(None)
                continue
            distribution = log_probs[index]
            values, top = distribution.topk(width)
            entries: dict[str, float] = {}
            for value, token in zip(values.tolist(), top.tolist(), strict=True):
                entries[self.table.strings[token]] = value  # strings shared by several ids collapse, as in the engines
            entries[strings[position]] = float(distribution[token_id])
            keys = list(entries)
            corrupted = self._corrupt([entries[key] for key in keys], position)
            top_logprobs.append(dict(zip(keys, corrupted, strict=True)))
            token_logprobs.append(float(distribution[token_id]))
        top_logprobs[0] = None
        token_logprobs[0] = None
        return {
            "tokens": tokens,
            "text_offset": offsets,
            "token_logprobs": token_logprobs,
            "top_logprobs": top_logprobs,
        }
