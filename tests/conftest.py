"""Session fixtures: offline guard, builtin corpus, a tokenizer trained on it, tiny models, the real teacher.

Everything here is offline. The environment is pinned to offline mode before any Hugging Face library is
imported, and any socket connection to (or name lookup of) a non-loopback address fails loudly instead of hanging.
Libraries catch such errors and retry with backoff (huggingface_hub waits ~23 s per call), which turns a stray
request into a silently slow test, so every blocked attempt is also recorded and fails the test that made it.
"""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"
os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "2")
os.environ.setdefault("HF_HUB_DOWNLOAD_TIMEOUT", "5")

import ipaddress  # noqa: E402
import socket  # noqa: E402

import pytest  # noqa: E402

_real_connect = socket.socket.connect
_real_connect_ex = socket.socket.connect_ex
_real_getaddrinfo = socket.getaddrinfo
_blocked_attempts: list[str] = []


def _is_local(address) -> bool:
    if isinstance(address, (str, bytes)):  # AF_UNIX
        return True
    host = address[0]
    if host in ("localhost",):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _refuse(what: str) -> RuntimeError:
    _blocked_attempts.append(what)
    return RuntimeError(f"test tried to reach the network ({what}); tests must stay offline")


def _guarded_connect(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address):
        raise _refuse(f"connect to {address!r}")
    return _real_connect(self, address)


def _guarded_connect_ex(self, address):
    if self.family in (socket.AF_INET, socket.AF_INET6) and not _is_local(address):
        raise _refuse(f"connect to {address!r}")
    return _real_connect_ex(self, address)


def _is_ip_literal(name: str) -> bool:
    try:
        ipaddress.ip_address(name.split("%")[0])
    except ValueError:
        return False
    return True


def _guarded_getaddrinfo(host, *args, **kwargs):
    # Host names only: an address literal (or "" / None, a local bind) needs no lookup, and connecting to a
    # non-loopback address is refused by the connect guard above.
    name = host.decode() if isinstance(host, bytes) else host
    if name and name not in ("localhost", socket.gethostname()) and not _is_ip_literal(name):
        raise _refuse(f"name lookup of {name!r}")  # not an OSError: HTTP clients do not retry it
    return _real_getaddrinfo(host, *args, **kwargs)


socket.socket.connect = _guarded_connect
socket.socket.connect_ex = _guarded_connect_ex
socket.getaddrinfo = _guarded_getaddrinfo


@pytest.fixture(autouse=True)
def _no_network_attempts():
    """Fail a test whose code tried the network even when a library swallowed the refusal and carried on."""
    del _blocked_attempts[:]
    yield
    attempts, _blocked_attempts[:] = list(_blocked_attempts), []
    if attempts:
        pytest.fail(f"tried to reach the network {len(attempts)} time(s): {sorted(set(attempts))}", pytrace=False)


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; none is present")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture(scope="session")
def corpus():
    from hf_interop import load_builtin_corpus

    return load_builtin_corpus()


@pytest.fixture(scope="session")
def corpus_tokenizer_dir(tmp_path_factory, corpus):
    """A 512-token byte-level BPE tokenizer trained on the corpus' train split (0.1 s), saved to a folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=512,
        special_tokens=["<|endoftext|>", "<pad>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus["train"]["text"], trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, eos_token="<|endoftext|>", bos_token="<|endoftext|>", pad_token="<pad>"
    )
    folder = tmp_path_factory.mktemp("corpus_tokenizer")
    fast.save_pretrained(folder)
    return folder


@pytest.fixture(scope="session")
def corpus_tokenizer(corpus_tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(corpus_tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory, corpus_tokenizer):
    """Saved tiny random Llama, Qwen2 and GPT-2 causal LMs (with the corpus tokenizer), keyed by family."""
    from helpers import FAMILIES, build_tiny_causal_lm

    dirs = {}
    for family in FAMILIES:
        model = build_tiny_causal_lm(family, len(corpus_tokenizer), seed=0, tokenizer=corpus_tokenizer)
        folder = tmp_path_factory.mktemp(f"tiny_{family}")
        model.save_pretrained(folder)
        corpus_tokenizer.save_pretrained(folder)
        dirs[family] = folder
    return dirs


@pytest.fixture(params=["llama", "qwen2", "gpt2"])
def tiny_model_dir(request, tiny_model_dirs):
    """Each tiny family in turn."""
    return tiny_model_dirs[request.param]


@pytest.fixture(scope="session")
def packed_corpus(corpus, corpus_tokenizer):
    """The corpus packed into 64-token blocks with the corpus tokenizer."""
    from hf_interop import pack_dataset

    return pack_dataset(corpus, corpus_tokenizer, block_size=64)


@pytest.fixture(scope="session")
def smollm2_dir():
    """The real SmolLM2-135M-Instruct teacher as a plain safetensors checkpoint (converted once, then cached)."""
    from hf_interop import default_teacher_path

    return default_teacher_path()


@pytest.fixture(scope="session")
def smollm2(smollm2_dir):
    """`(model, tokenizer)` of the real teacher, float32, eval mode. Do not modify it in tests."""
    from hf_interop import load_causal_lm

    return load_causal_lm(smollm2_dir, dtype="float32")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_dir):
    from hf_interop import load_tokenizer

    return load_tokenizer(smollm2_dir)


@pytest.fixture(scope="session")
def tiny_smollm2_student_dir(tmp_path_factory, smollm2_tokenizer):
    """A tiny random Llama that shares SmolLM2's tokenizer (vocabulary 49,152): a student for the real teacher."""
    from helpers import build_tiny_causal_lm

    model = build_tiny_causal_lm("llama", 49152, seed=0, tokenizer=smollm2_tokenizer)
    folder = tmp_path_factory.mktemp("tiny_smollm2_student")
    model.save_pretrained(folder)
    smollm2_tokenizer.save_pretrained(folder)
    return folder
