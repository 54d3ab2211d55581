"""Configuration of :class:`~hf_interop.DistillationTrainer`: a `TrainingArguments` with the knobs of distillation."""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass, field
from typing import Any, ClassVar

from transformers import TrainingArguments

from ..losses.names import HIDDEN_LOSS_TYPES, LOSS_BACKENDS, LOSS_TYPES

# One list of loss names, shared with the losses (`losses/names.py` is torch-free, so a config imports no math).
DISTILLATION_LOSS_TYPES = LOSS_TYPES
SPARSE_TAIL_TYPES = ("bucket", "teacher_marginal")
_CROSS_TOKENIZER_LOSS_TYPES = ("uld", "gold")


@dataclass
class DistillationConfig(TrainingArguments):
    r"""
    Configuration of [`DistillationTrainer`]: everything [`~transformers.TrainingArguments`] holds, plus the loss,
    the teacher and the generation settings of knowledge distillation.

    The student learns from `kd_ratio * kd_loss + (1 - kd_ratio) * ce_loss (+ hidden_loss_weight * hidden_loss)`, every
    term normalised by the number of valid target tokens of the whole (accumulated, multi-process) batch.

    Args:
        > Loss

        loss_type (`str`, *optional*, defaults to `"forward_kl"`):
            Token-level divergence between teacher and student next-token distributions: `"forward_kl"` (Hinton KD,
            KL(teacher || student)), `"reverse_kl"` (KL(student || teacher), mode seeking, MiniLLM), `"jsd"`
            (generalized Jensen-Shannon, see `jsd_beta`, GKD https://huggingface.co/papers/2306.13649), `"skew_kl"`
            and `"skew_reverse_kl"` (DistiLLM https://huggingface.co/papers/2402.03898, see `skew_alpha`), `"tvd"`
            (total variation distance) or `"mse"` (mean squared error between tempered logits).
        jsd_beta (`float`, *optional*, defaults to `0.5`):
            Interpolation of the generalized JSD, in [0, 1]: `0.0` is exactly forward KL, `1.0` exactly reverse KL,
            `0.5` the symmetric JSD. Used only with `loss_type="jsd"`.
        skew_alpha (`float`, *optional*, defaults to `0.1`):
            Share of the other distribution mixed into the reference of the skew divergences, in [0, 1]. Used only with
            `loss_type="skew_kl"` / `"skew_reverse_kl"`.
        temperature (`float`, *optional*, defaults to `1.0`):
            KD temperature, > 0: both models' logits are divided by it before the divergence. Higher softens the
            distributions and weighs the teacher's small probabilities more.
        scale_by_temperature_squared (`bool`, *optional*):
            Multiply the divergence by `temperature**2` so gradient magnitudes do not shrink as the temperature
            grows. `None` (default) turns it on for `forward_kl` only, as Hinton et al.
        kd_ratio (`float`, *optional*, defaults to `0.5`):
            Weight of the distillation loss against the cross-entropy on the labels, in [0, 1]: `1.0` is pure
            distillation, `0.0` plain language-model training.
        hidden_loss_weight (`float`, *optional*, defaults to `0.0`):
            Weight (>= 0) of an extra loss between hidden states of chosen student and teacher layers. `0` turns it off.
        hidden_layer_map (`list[list[int]]` or `str`, *optional*):
            Pairs `[student_layer, teacher_layer]` of hidden-state indices (`0` is the embedding output, `i` the
            output of layer `i`, as in `output_hidden_states`) compared by the hidden loss, e.g. `[[1, 2], [2, 4]]`.
            A JSON string is accepted (command line). Required when `hidden_loss_weight > 0`.
        hidden_loss_type (`str`, *optional*, defaults to `"mse"`):
            `"mse"` (mean over features of the squared difference) or `"cosine"` (1 - cosine similarity) between the
            projected student hidden state and the teacher's. When the widths differ, a learned linear projection
            (trained with the student and saved in checkpoints) maps the student width to the teacher's.
        loss_chunk_size (`int`, *optional*, defaults to `1024`):
            Valid tokens per chunk of the memory-efficient loss, which never builds the full (batch, sequence,
            vocabulary) logits of either model. Larger is a little faster and uses more memory. `0` computes the loss
            from full logits (the dense path).
        loss_backend (`str`, *optional*, defaults to `"auto"`):
            How the chunked loss computes each chunk: `"eager"` (PyTorch ops), `"compiled"` (one `torch.compile`d
            kernel per chunk: the log-softmaxes, divergence, cross-entropy and gradient fused; compiles once per run),
            `"liger"` (Liger-Kernel's fused linear losses on CUDA, `pip install 'hf_interop[liger-kernel]'`) or
            `"auto"` (Liger when installed and applicable, else compiled for large chunks, else eager; a failed
            compilation warns once and runs eagerly). The loss is the same whichever runs.

        > Teacher

        teacher_model_name_or_path (`str`, *optional*):
            Hub id, local folder or `.gguf` file of the teacher, loaded through [`load_causal_lm`] when the trainer is
            not given a `teacher_model`.
        teacher_revision (`str`, *optional*):
            Branch, tag or commit of a hub teacher. Pin a commit hash for reproducible runs.
        teacher_dtype (`str`, *optional*):
            Dtype of a teacher loaded by name (`"float32"`, `"bfloat16"`, `"auto"`, ...). Defaults to the
            checkpoint's own handling.
        teacher_device_map (`str` or `dict`, *optional*):
            Where the teacher lives, through Accelerate: e.g. `{"": "cuda:1"}` (a second GPU) or `"auto"` (spread over
            the devices, limited by `teacher_max_memory`). Defaults to the student's device. A JSON string is
            accepted (command line).
        teacher_max_memory (`dict`, *optional*):
            With `teacher_device_map="auto"`: the most memory the teacher may take per device, e.g.
            `{0: "10GiB", 1: "20GiB", "cpu": "30GiB"}`.
        teacher_logits_path (`str`, *optional*):
            Folder of a teacher cache written by [`cache_teacher_logits`] (top-k teacher log-probabilities of the
            training set). When set, no teacher is loaded or run: the loss uses the cached distributions.
        teacher_url (`str`, *optional*):
            Base URL of an OpenAI-compatible server that serves the teacher (vLLM, llama.cpp's server,
            llama-cpp-python, SGLang), e.g. `"http://127.0.0.1:8000/v1"`. Each step asks it for the top-k
            log-probabilities of every position of the batch (asked while the student computes the previous batch)
            and uses the sparse top-k + tail loss, as with a cache. Needs the student's tokenizer (checked against
            the server's before training) and a `loss_type` of the sparse family. A `teacher_model` or
            `teacher_model_name_or_path` starting with `http://` or `https://` means the same.
        teacher_served_model (`str`, *optional*):
            The served model's name; defaults to the one the server lists first.
        teacher_top_k (`int`, *optional*, defaults to `20`):
            Log-probabilities asked per position from a served teacher (vLLM allows 20 unless started with a higher
            `--max-logprobs`). Higher covers more of the teacher's mass and costs more transfer and parsing.
        teacher_concurrency (`int`, *optional*, defaults to `4`):
            Requests in flight to a served teacher (one row each).
        teacher_request_timeout (`float`, *optional*, defaults to `300`):
            Seconds a request may take before it is retried.
        teacher_max_retries (`int`, *optional*, defaults to `4`):
            Retries after a connection error, timeout, 429 or 5xx, with exponential backoff; then training stops
            with an error naming the step.
        teacher_api_key_env (`str`, *optional*, defaults to `"OPENAI_API_KEY"`):
            Environment variable holding the served teacher's API key (sent as a bearer token when set).
        student_generation_url (`str`, *optional*):
            With `lmbda > 0`: generate the on-policy text with this server (a served copy of the student that the
            user keeps in step with training, e.g. vLLM with weight reloading) instead of the in-process student.
        sparse_tail (`str`, *optional*, defaults to `"bucket"`):
            How a teacher cache's tail (the probability mass outside its top-k) is used; only with
            `teacher_logits_path`. `"bucket"`: one bucket, matched by the student's total mass outside the top-k ids
            (the student's shape inside the tail is left free; cheapest). `"teacher_marginal"`: the tail mass is
            spread over the other tokens in proportion to the teacher's mean distribution over the cache
            ([`TeacherLogitsCache.tail_prior_logprobs`]) and the divergence is taken over the whole vocabulary
            (a `(chunk, vocabulary)` teacher tensor per loss chunk, no teacher forward). Measured with SmolLM2-135M at
            k=64 (`benchmarks/results/teacher_cache.md`): it helps a randomly initialised student (held-out
            perplexity 0.966x online full-vocabulary KD vs 1.010x with `"bucket"`, 20 steps) and hurts a student
            initialised from the teacher's layers (1.125x vs 0.972x, 40 steps), whose own tail is already shaped
            like the teacher's; keep `"bucket"` there.

        > Output and loading

        overwrite_output_dir (`bool`, *optional*, defaults to `False`):
            Let training replace a model already saved in `output_dir` (`config.json`, `model.safetensors`, adapter
            or tokenizer files at its top level). Without it such a folder is refused before anything loads (or, when
            it also holds checkpoints, at `train()` unless `train(resume_from_checkpoint=...)` resumes one of them).
        allow_pickle (`bool`, *optional*, defaults to `False`):
            Also load pickle (`.bin`) weights for a student or teacher given by name/path. Pickle can run code when
            loaded: only for checkpoints you trust. Safetensors only by default.

        > Generation (on-policy and sequence-level distillation)

        lmbda (`float`, *optional*, defaults to `0.0`):
            Probability, in [0, 1], that a training step replaces the batch's continuations with text the student
            generates from each row's prompt (on-policy distillation, GKD https://huggingface.co/papers/2306.13649).
            Drawn once per optimizer step from `(seed, step)`, so resumed runs draw the same. Generated steps are
            normalised per micro-batch (the mean of micro-batch means), since the global token count of generated
            text is unknown before generation.
        seq_kd (`bool`, *optional*, defaults to `False`):
            On the steps that are not on-policy, train on continuations the teacher generates (sequence-level KD,
            https://huggingface.co/papers/1606.07947).
        generation_prompt_length (`int`, *optional*, defaults to `32`):
            The prompt that generation continues: a row whose labels mask a leading prompt (prompt/completion data,
            labels -100 on the prompt) uses that prompt; other rows (plain text) use their first
            `generation_prompt_length` tokens. Prompt tokens are never training targets on generated steps.
        max_new_tokens (`int`, *optional*, defaults to `64`):
            Tokens generated per row on on-policy / sequence-level steps. Everything after the first EOS is masked.
        generation_temperature (`float`, *optional*, defaults to `1.0`):
            Sampling temperature of on-policy / sequence-level generation (> 0).
        generation_top_p (`float`, *optional*, defaults to `1.0`):
            Nucleus sampling threshold, in (0, 1].
        generation_top_k (`int`, *optional*, defaults to `0`):
            Top-k sampling; `0` disables it.
    """

    # Fields that accept a JSON dict on the command line (TrainingArguments parses them in __post_init__).
    _VALID_DICT_FIELDS = [*TrainingArguments._VALID_DICT_FIELDS, "teacher_device_map", "teacher_max_memory"]

    # ---- loss ----
    loss_type: str = field(
        default="forward_kl",
        metadata={
            "help": "Token-level divergence: forward_kl (Hinton KD), reverse_kl, jsd (see jsd_beta), skew_kl, "
            "skew_reverse_kl (see skew_alpha), tvd or mse.",
            "choices": list(DISTILLATION_LOSS_TYPES),
        },
    )
    jsd_beta: float = field(
        default=0.5,
        metadata={"help": "Generalized JSD interpolation in [0, 1]: 0 = forward KL, 1 = reverse KL, 0.5 = JSD."},
    )
    skew_alpha: float = field(
        default=0.1,
        metadata={"help": "Mixing share of the skew divergences (DistiLLM), in [0, 1]."},
    )
    temperature: float = field(
        default=1.0,
        metadata={"help": "KD temperature (> 0) dividing both models' logits; higher softens the distributions."},
    )
    scale_by_temperature_squared: bool | None = field(
        default=None,
        metadata={"help": "Multiply the divergence by temperature**2. Default: on for forward_kl only (Hinton)."},
    )
    kd_ratio: float = field(
        default=0.5,
        metadata={"help": "Weight of the distillation loss vs cross-entropy on labels, in [0, 1]; 1 = pure KD."},
    )
    hidden_loss_weight: float = field(
        default=0.0,
        metadata={"help": "Weight (>= 0) of the hidden-state loss between mapped layers; 0 turns it off."},
    )
    hidden_layer_map: list[list[int]] | str | None = field(
        default=None,
        metadata={
            "help": "Pairs [student_layer, teacher_layer] of hidden-state indices (0 = embeddings), e.g. "
            "'[[1, 2], [2, 4]]'. Required when hidden_loss_weight > 0."
        },
    )
    hidden_loss_type: str = field(
        default="mse",
        metadata={
            "help": "Hidden-state loss: mse or cosine (1 - cosine similarity), through a learned projection when "
            "widths differ.",
            "choices": list(HIDDEN_LOSS_TYPES),
        },
    )
    loss_chunk_size: int = field(
        default=1024,
        metadata={
            "help": "Valid tokens per chunk of the memory-efficient loss (no full logits tensor). Larger: faster, more "
            "memory. 0 = dense loss from full logits."
        },
    )
    loss_backend: str = field(
        default="auto",
        metadata={
            "help": "How the chunked loss computes each chunk: eager, compiled (torch.compile), liger (Liger-Kernel, "
            "CUDA) or auto (the fastest that applies).",
            "choices": list(LOSS_BACKENDS),
        },
    )

    # ---- teacher ----
    teacher_model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "Hub id, local folder or .gguf file of the teacher (when no teacher_model is passed)."},
    )
    teacher_revision: str | None = field(
        default=None,
        metadata={"help": "Branch, tag or commit of a hub teacher; pin a commit for reproducibility."},
    )
    teacher_dtype: str | None = field(
        default=None,
        metadata={"help": "Dtype of a teacher loaded by name: float32, bfloat16, float16 or auto."},
    )
    teacher_device_map: dict | str | None = field(
        default=None,
        metadata={
            "help": "Teacher placement through Accelerate, e.g. '{\"\": \"cuda:1\"}' or 'auto'. Default: the "
            "student's device."
        },
    )
    teacher_max_memory: dict | str | None = field(
        default=None,
        metadata={"help": "With teacher_device_map='auto': memory limit per device, e.g. '{\"0\": \"10GiB\"}'."},
    )
    teacher_logits_path: str | None = field(
        default=None,
        metadata={"help": "Folder of a teacher cache (cache_teacher_logits); no teacher is run when it is set."},
    )
    teacher_url: str | None = field(
        default=None,
        metadata={"help": "Base URL of an OpenAI-compatible server serving the teacher (vLLM, llama.cpp)."},
    )
    teacher_served_model: str | None = field(
        default=None, metadata={"help": "The served teacher's model name (default: the one the server lists)."}
    )
    teacher_top_k: int = field(
        default=20, metadata={"help": "Log-probabilities asked per position from a served teacher."}
    )
    teacher_concurrency: int = field(default=4, metadata={"help": "Requests in flight to a served teacher."})
    teacher_request_timeout: float = field(
        default=300.0, metadata={"help": "Seconds a request to a served teacher may take before it is retried."}
    )
    teacher_max_retries: int = field(
        default=4, metadata={"help": "Retries of a failed request to a served teacher (backoff doubles)."}
    )
    teacher_api_key_env: str = field(
        default="OPENAI_API_KEY", metadata={"help": "Environment variable with the served teacher's API key."}
    )
    student_generation_url: str | None = field(
        default=None,
        metadata={"help": "With lmbda > 0: a server with a copy of the student that generates the on-policy text."},
    )
    sparse_tail: str = field(
        default="bucket",
        metadata={
            "help": "With teacher_logits_path: 'bucket' (the tail outside the top-k is one bucket) or "
            "'teacher_marginal' (the tail spread like the teacher's mean distribution over the cache).",
            "choices": list(SPARSE_TAIL_TYPES),
        },
    )

    # ---- output and loading ----
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace a model already saved in output_dir (otherwise such a folder is an error, unless its own "
            "checkpoints are resumed)."
        },
    )
    allow_pickle: bool = field(
        default=False,
        metadata={
            "help": "Also load pickle (.bin) weights for a student or teacher given by path; they can run code when "
            "loaded, so only for checkpoints you trust (default: safetensors only)."
        },
    )

    # ---- generation ----
    lmbda: float = field(
        default=0.0,
        metadata={"help": "Probability in [0, 1] that a step trains on student-generated continuations (GKD)."},
    )
    seq_kd: bool = field(
        default=False,
        metadata={"help": "Train on teacher-generated continuations on the steps that are not on-policy."},
    )
    generation_prompt_length: int = field(
        default=32,
        metadata={"help": "Prompt length for generation on rows without a label-masked prompt: their first N tokens."},
    )
    max_new_tokens: int = field(
        default=64,
        metadata={"help": "Tokens generated per row on on-policy / sequence-level steps."},
    )
    generation_temperature: float = field(
        default=1.0,
        metadata={"help": "Sampling temperature (> 0) of on-policy / sequence-level generation."},
    )
    generation_top_p: float = field(
        default=1.0,
        metadata={"help": "Nucleus sampling threshold in (0, 1] for generation."},
    )
    generation_top_k: int = field(
        default=0,
        metadata={"help": "Top-k sampling for generation; 0 disables it."},
    )

    def __post_init__(self) -> None:
        # Distillation settings are checked first: a wrong value fails at once, before TrainingArguments sets up
        # devices and distributed state.
        self._check_distillation_fields()
        super().__post_init__()

    # Loss names this config accepts; `CrossTokenizerDistillationConfig` accepts its own set instead.
    allowed_loss_types: ClassVar[tuple[str, ...]] = DISTILLATION_LOSS_TYPES
    # a served teacher answers its top-k: same-tokenizer KD compares it with the sparse losses only
    served_teacher_needs_sparse_loss: ClassVar[bool] = True

    def _check_distillation_fields(self) -> None:
        # order matters: of several wrong values, the first one checked is reported
        self._check_loss_fields()
        self._check_generation_fields()
        self._check_teacher_fields()

    def _check_loss_fields(self) -> None:
        """The loss: its name, temperature, the [0, 1] weights (and `lmbda`), the hidden-state loss, the chunk size."""
        if self.loss_type in _CROSS_TOKENIZER_LOSS_TYPES and self.loss_type not in self.allowed_loss_types:
            raise ValueError(
                f"loss_type={self.loss_type!r} is cross-tokenizer distillation: use "
                "`hf_interop.CrossTokenizerDistillationConfig` with `hf_interop.CrossTokenizerDistillationTrainer`, "
                f"or a teacher that shares the student's tokenizer with one of {list(DISTILLATION_LOSS_TYPES)}."
            )
        if self.loss_type not in self.allowed_loss_types:
            raise ValueError(
                f"loss_type={self.loss_type!r} is not a known divergence; use one of {list(self.allowed_loss_types)}."
            )
        if not self.temperature > 0:  # also rejects NaN
            raise ValueError(
                f"temperature={self.temperature} must be > 0 (it divides the logits); use 1.0 for the plain "
                "distributions or e.g. 2.0 to soften them."
            )
        for name in ("jsd_beta", "skew_alpha", "kd_ratio", "lmbda"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}={value} is outside [0, 1]; pass a value between 0.0 and 1.0.")
        if not self.hidden_loss_weight >= 0:
            raise ValueError(
                f"hidden_loss_weight={self.hidden_loss_weight} must be >= 0; use 0.0 to turn the hidden loss off."
            )
        if self.hidden_loss_type not in HIDDEN_LOSS_TYPES:
            raise ValueError(
                f"hidden_loss_type={self.hidden_loss_type!r} is not known; use one of {list(HIDDEN_LOSS_TYPES)}."
            )
        self.hidden_layer_map = _parse_layer_map(self.hidden_layer_map)
        if self.hidden_loss_weight > 0 and not self.hidden_layer_map:
            raise ValueError(
                f"hidden_loss_weight={self.hidden_loss_weight} needs hidden_layer_map, e.g. [[1, 2], [2, 4]] "
                "(pairs of [student_layer, teacher_layer]); or set hidden_loss_weight=0."
            )
        if self.loss_chunk_size < 0:
            raise ValueError(
                f"loss_chunk_size={self.loss_chunk_size} must be >= 0; use e.g. 1024 (chunked loss) or 0 (dense loss)."
            )
        _check_loss_backend(self.loss_backend, self.loss_type)

    def _check_generation_fields(self) -> None:
        """On-policy and sequence-level generation: prompt length, new tokens and sampling settings."""
        if self.generation_prompt_length < 1:
            raise ValueError(
                f"generation_prompt_length={self.generation_prompt_length} must be >= 1 (generation needs a prompt)."
            )
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be >= 1.")
        if not self.generation_temperature > 0:
            raise ValueError(
                f"generation_temperature={self.generation_temperature} must be > 0; use 1.0 to sample from the "
                "model's distribution."
            )
        if not 0.0 < self.generation_top_p <= 1.0:
            raise ValueError(f"generation_top_p={self.generation_top_p} must be in (0, 1]; 1.0 disables it.")
        if self.generation_top_k < 0:
            raise ValueError(f"generation_top_k={self.generation_top_k} must be >= 0; 0 disables it.")

    def _check_teacher_fields(self) -> None:
        """Teacher placement (JSON strings from the command line are parsed) and the teacher cache's settings."""
        if isinstance(self.teacher_device_map, str) and self.teacher_device_map.startswith("{"):
            self.teacher_device_map = json.loads(self.teacher_device_map)
        if isinstance(self.teacher_max_memory, str):
            self.teacher_max_memory = json.loads(self.teacher_max_memory)
        if isinstance(self.teacher_max_memory, dict):
            # JSON keys are strings; Accelerate wants GPU indices as ints.
            self.teacher_max_memory = {
                (int(key) if isinstance(key, str) and key.isdigit() else key): value
                for key, value in self.teacher_max_memory.items()
            }
        if self.teacher_max_memory is not None and self.teacher_device_map not in ("auto", "balanced", "sequential"):
            raise ValueError(
                f"teacher_max_memory={self.teacher_max_memory} is used only with teacher_device_map='auto', but "
                f"teacher_device_map={self.teacher_device_map!r}; set teacher_device_map='auto' or drop the limit."
            )
        self._check_served_teacher()
        if self.teacher_logits_path is not None and (self.lmbda > 0 or self.seq_kd):
            raise ValueError(
                f"teacher_logits_path={self.teacher_logits_path!r} holds the teacher's distributions of the fixed "
                f"training set, but lmbda={self.lmbda} / seq_kd={self.seq_kd} train on newly generated text; use a "
                "live teacher for on-policy or sequence-level distillation, or set lmbda=0 and seq_kd=False."
            )
        if self.sparse_tail not in SPARSE_TAIL_TYPES:
            raise ValueError(f"sparse_tail={self.sparse_tail!r} is not known; use one of {list(SPARSE_TAIL_TYPES)}.")
        if self.sparse_tail != "bucket" and self.teacher_logits_path is None:
            raise ValueError(
                f"sparse_tail={self.sparse_tail!r} shapes the tail of a teacher cache, but teacher_logits_path is "
                "not set; set teacher_logits_path to a cache folder, or leave sparse_tail='bucket' with a live teacher."
            )
        if self.teacher_logits_path is not None and self.hidden_loss_weight > 0:
            raise ValueError(
                f"hidden_loss_weight={self.hidden_loss_weight} needs the teacher's hidden states, which a teacher "
                f"cache (teacher_logits_path={self.teacher_logits_path!r}) does not hold; set hidden_loss_weight=0 "
                "or use a live teacher."
            )

    def _check_served_teacher(self) -> None:
        from ..losses.names import SPARSE_LOSS_TYPES

        if self.teacher_url is None and str(self.teacher_model_name_or_path or "").startswith(("http://", "https://")):
            self.teacher_url, self.teacher_model_name_or_path = self.teacher_model_name_or_path, None
        for name in ("teacher_url", "student_generation_url"):
            value = getattr(self, name)
            if value is not None and not str(value).startswith(("http://", "https://")):
                raise ValueError(f"{name}={value!r} is not an http(s) URL; give e.g. http://127.0.0.1:8000/v1.")
        for name, low in (("teacher_top_k", 1), ("teacher_concurrency", 1), ("teacher_max_retries", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"{name} must be an integer >= {low}, got {value!r}.")
        if not self.teacher_request_timeout > 0:
            raise ValueError(f"teacher_request_timeout must be > 0 seconds, got {self.teacher_request_timeout!r}.")
        if self.teacher_url is None:
            return
        if self.teacher_logits_path is not None:
            raise ValueError(
                f"teacher_url={self.teacher_url!r} and teacher_logits_path={self.teacher_logits_path!r} are two "
                "teachers; pass one (capture a cache from the server with cache_teacher_logits(teacher=URL))."
            )
        if self.loss_type not in SPARSE_LOSS_TYPES and self.served_teacher_needs_sparse_loss:
            raise ValueError(
                f"loss_type={self.loss_type!r} needs the teacher's whole distribution, but a served teacher gives its "
                f"top-{self.teacher_top_k}; use one of {list(SPARSE_LOSS_TYPES)} with teacher_url."
            )
        if self.hidden_loss_weight > 0:
            raise ValueError(
                f"hidden_loss_weight={self.hidden_loss_weight} needs the teacher's hidden states, which a served "
                f"teacher (teacher_url={self.teacher_url!r}) does not return; set hidden_loss_weight=0."
            )

    def loss_kwargs(self) -> dict[str, Any]:
        """The divergence settings every loss path of the distillation trainers passes on (dense, chunked, sparse)."""
        names = ("loss_type", "temperature", "jsd_beta", "skew_alpha", "scale_by_temperature_squared", "kd_ratio")
        return {name: getattr(self, name) for name in names}

    def distillation_hyperparameters(self) -> dict[str, Any]:
        """The distillation settings (no generic training arguments), for model cards and logs."""
        names = ["loss_type", "temperature", "kd_ratio", "loss_chunk_size"]
        if self.loss_type == "jsd":
            names.append("jsd_beta")
        if self.loss_type.startswith("skew"):
            names.append("skew_alpha")
        if self.hidden_loss_weight > 0:
            names += ["hidden_loss_weight", "hidden_layer_map", "hidden_loss_type"]
        if self.teacher_logits_path is not None:
            names.append("sparse_tail")
        if self.teacher_url is not None:
            names += ["teacher_served_model", "teacher_top_k"]
        if self.lmbda > 0 or self.seq_kd:
            names += ["lmbda", "seq_kd", "max_new_tokens", "generation_temperature"]
        names += ["learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps", "max_steps"]
        return {name: getattr(self, name) for name in names}


def _parse_layer_map(value: Any) -> list[list[int]] | None:
    if value is None or value == "":
        return None
    original = value
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"hidden_layer_map={original!r} is not valid JSON; write pairs like '[[1, 2], [2, 4]]'."
            ) from error
    pairs = []
    try:
        for pair in value:
            student_layer, teacher_layer = pair
            if isinstance(student_layer, bool) or isinstance(teacher_layer, bool):
                raise TypeError
            pairs.append([int(student_layer), int(teacher_layer)])
            if pairs[-1][0] < 0 or pairs[-1][1] < 0:
                raise ValueError(
                    f"hidden_layer_map={original!r} has a negative layer index {pair}; use indices >= 0 "
                    "(0 = embedding output, i = output of layer i)."
                )
    except (TypeError, ValueError) as error:
        if isinstance(error, ValueError) and "negative" in str(error):
            raise
        raise ValueError(
            f"hidden_layer_map={original!r} must be a list of [student_layer, teacher_layer] integer pairs, e.g. "
            "[[1, 2], [2, 4]]."
        ) from error
    return pairs or None


def _check_loss_backend(backend: str, loss_type: str) -> None:
    """`loss_backend` names a backend; `"liger"` needs its package and a divergence it has (checked here, before any
    model loads; whether the device is CUDA is only known in the loss, which raises there)."""
    if backend not in LOSS_BACKENDS:
        raise ValueError(f"loss_backend={backend!r} is not known; use one of {list(LOSS_BACKENDS)}.")
    if backend != "liger":
        return
    if importlib.util.find_spec("liger_kernel") is None:
        raise ValueError(
            "loss_backend='liger' needs Liger-Kernel, which is not installed: pip install 'hf_interop[liger-kernel]' "
            "(or liger-kernel itself); or use loss_backend='auto' (compiled or eager)."
        )
    from ..losses.names import LIGER_LOSS_TYPES

    if loss_type not in LIGER_LOSS_TYPES:
        raise ValueError(
            f"loss_backend='liger' has no {loss_type!r} loss (Liger-Kernel fuses {list(LIGER_LOSS_TYPES)}); use "
            "loss_backend='auto', which falls back to the compiled kernel for it."
        )
