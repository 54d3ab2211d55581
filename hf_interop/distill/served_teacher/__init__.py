"""Teachers behind an inference engine: any OpenAI-compatible completions server (vLLM, llama.cpp, SGLang).

- :class:`ServedTeacher` (`client.py`): the HTTP client: start-up checks, top-k per row, retries, concurrency.
- `responses.py`: the two answer shapes (vLLM `prompt_logprobs`, OpenAI `echo` + `logprobs`) read into cache rows.
- `tokens.py`: a server's token strings matched to the student tokenizer's ids.
- `online.py`: the trainer's side: answers asked for while the student steps (prefetch), turned into loss inputs.
"""

from .client import DEFAULT_API_KEY_ENV, ServedTeacher, ServedTeacherError, is_teacher_url
from .responses import ServedTeacherAnswerError, parse_echo_logprobs, parse_vllm_prompt_logprobs
from .tokens import TokenStringTable, align_server_tokens

__all__ = [
    "DEFAULT_API_KEY_ENV",
    "ServedTeacher",
    "ServedTeacherAnswerError",
    "ServedTeacherError",
    "TokenStringTable",
    "align_server_tokens",
    "is_teacher_url",
    "parse_echo_logprobs",
    "parse_vllm_prompt_logprobs",
]
