"""Configuration of multi-teacher distillation: a `DistillationConfig` plus the teachers and how they are combined."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, ClassVar

from ..cross_tokenizer_config import CROSS_TOKENIZER_LOSS_TYPES, CrossTokenizerSettings
from ..distillation_config import DISTILLATION_LOSS_TYPES, DistillationConfig
from .combination import TEACHER_COMBINATIONS, TEACHER_WEIGHTINGS, check_route_weights, check_teacher_weights


@dataclass
class MultiTeacherDistillationConfig(CrossTokenizerSettings, DistillationConfig):
    r"""
    Configuration of [`MultiTeacherDistillationTrainer`]: a [`DistillationConfig`] whose student learns from several
    teachers at once, each example routed to one teacher or taught by a weighted combination of all of them.

    Args:
        teachers (`dict[str, str]`, *optional*):
            Teacher name -> hub id, local folder, `.gguf` file or alias (`default_teacher`) of each teacher (the
            trainer's `teachers=` argument also takes model objects). Names appear in the routing column, in
            `teacher_weights`, in the per-teacher metrics (`kd_loss/<name>`) and in the model card. A JSON string is
            accepted (command line).
        teacher_combination (`str`, *optional*, defaults to `"route"`):
            `"route"`: each example learns from the one teacher its `teacher_column` names (only that teacher runs
            on it). `"mixture"`: from `sum_k w_k p_k`, the teachers' distributions (at `temperature`) averaged with
            per-example weights. `"product"`: from the product of experts `prod_k p_k^{w_k} / Z`.
        teacher_column (`str`, *optional*, defaults to `"teacher"`):
            With `"route"`: the dataset column holding each example's teacher name.
        teacher_weighting (`str`, *optional*, defaults to `"static"`):
            With `"mixture"` / `"product"`: `"static"` (`teacher_weights` for every example) or `"confidence"`
            (per example, a softmax over teachers of their mean log-likelihood of the example's text divided by
            `confidence_temperature`, with `teacher_weights` as the prior; see
            `hf_interop.distill.multi_teacher.combination`).
        teacher_weights (`dict[str, float]`, *optional*):
            Teacher name -> non-negative weight, normalised to sum to one; uniform when omitted.
        route_weights (`dict[str, float]`, *optional*):
            With `"route"`: teacher name -> the weight of the loss on the rows routed to it (KD and cross-entropy
            of those rows), as static task weights in `MultiTaskTrainer` (`multitask.weighting.static_weighted_sum`),
            not normalised; names left out weigh 1. Per-domain KD weights: name the routing column's values after
            the domains and register the same teacher under each (`teachers={"code": t, "prose": t}`).
        confidence_temperature (`float`, *optional*, defaults to `1.0`):
            Divides the confidence scores (nats per token) before the softmax: larger is closer to the static
            weights, smaller closer to routing each example to its most confident teacher.
        teacher_device_maps (`dict[str, str | dict]`, *optional*):
            Teacher name -> device map for that teacher (`"cuda:1"`, `"auto"`, or a module -> device dict), placed
            by Accelerate; teachers not named here follow `teacher_device_map` (default: the student's device).
        lazy_teacher_loading (`bool`, *optional*, defaults to `False`):
            Load a teacher given by name only when the first batch needs it (its config and tokenizer are still
            checked before training starts). Saves memory when a routed run reaches a teacher late or never.
        cross_tokenizer (`bool`, *optional*, defaults to `False`):
            Teachers whose tokenizers differ from the student's: the dataset holds raw text (`text_column`), each
            teacher reads its own tokenisation, and each is compared with the student on aligned spans (the
            hybrid loss of [`CrossTokenizerDistillationConfig`], whose settings `matched_weight`,
            `unmatched_weight`, `uld_top_k`, `alignment`, `max_length`, `text_column`, `*_start_token` and
            `max_vocab_union_size` apply; `loss_type` one of forward_kl / reverse_kl / jsd / gold / uld).
            Teachers are combined at the loss, `sum_k w_bk D_k(b)` over each teacher's spans of example `b`: for
            forward KL this has the gradient of KL(mixture || student) wherever the teachers' spans coincide.
            `"product"` needs one vocabulary and is refused.
        per_teacher_metrics (`bool`, *optional*, defaults to `True`):
            With `"mixture"` / `"product"`: also compute, without gradient, each teacher's own KD loss and top-1
            agreement with the student (one extra loss evaluation per teacher per step). Routing reports them for
            free.
    """

    teachers: dict[str, Any] | str | None = field(
        default=None,
        metadata={"help": "Teacher name -> hub id / folder / .gguf / alias; a JSON string on the command line."},
    )
    teacher_combination: str = field(
        default="route",
        metadata={
            "help": "route (each example's teacher column), mixture or product (weighted combination).",
            "choices": list(TEACHER_COMBINATIONS),
        },
    )
    teacher_column: str = field(default="teacher", metadata={"help": "Column naming each example's teacher (route)."})
    teacher_weighting: str = field(
        default="static",
        metadata={
            "help": "mixture/product: static (teacher_weights) or confidence (each teacher's likelihood of the text).",
            "choices": list(TEACHER_WEIGHTINGS),
        },
    )
    teacher_weights: dict[str, float] | str | None = field(
        default=None, metadata={"help": "Teacher name -> weight (>= 0, normalised); uniform when omitted."}
    )
    route_weights: dict[str, float] | str | None = field(
        default=None,
        metadata={"help": "route: routed name -> weight of its rows' loss (>= 0, not normalised); 1 when omitted."},
    )
    confidence_temperature: float = field(
        default=1.0, metadata={"help": "Divides the confidence scores before the softmax over teachers (> 0)."}
    )
    teacher_device_maps: dict[str, Any] | str | None = field(
        default=None, metadata={"help": "Teacher name -> device map; others follow teacher_device_map."}
    )
    lazy_teacher_loading: bool = field(
        default=False, metadata={"help": "Load a teacher given by name when the first batch needs it."}
    )
    cross_tokenizer: bool = field(
        default=False,
        metadata={
            "help": "Teachers with other tokenizers: raw text in, each teacher aligned to the student by spans."
        },
    )
    per_teacher_metrics: bool = field(
        default=True, metadata={"help": "mixture/product: log each teacher's KD loss and top-1 agreement."}
    )

    # same-tokenizer divergences, plus the span losses "gold" and "uld" (with cross_tokenizer=True only)
    allowed_loss_types: ClassVar[tuple[str, ...]] = tuple(dict.fromkeys([*DISTILLATION_LOSS_TYPES, "gold", "uld"]))
    _VALID_DICT_FIELDS = [
        *DistillationConfig._VALID_DICT_FIELDS,
        "teachers",
        "teacher_weights",
        "route_weights",
        "teacher_device_maps",
    ]

    def _check_distillation_fields(self) -> None:
        super()._check_distillation_fields()
        for name in ("teachers", "teacher_weights", "route_weights", "teacher_device_maps"):
            value = getattr(self, name)
            if isinstance(value, str):
                try:
                    setattr(self, name, json.loads(value))
                except json.JSONDecodeError as error:
                    raise ValueError(
                        f'{name}={value!r} is not valid JSON; pass a dict such as \'{{"code": "path/a", "prose": '
                        '"path/b"}\'.'
                    ) from error
        if self.teachers is not None:
            check_teacher_names(self.teachers)
            for name, source in self.teachers.items():
                if not isinstance(source, (str, os.PathLike)):
                    raise ValueError(
                        f"teachers[{name!r}]={source!r} must be a hub id, folder, .gguf file or alias in the config; "
                        "pass model objects through MultiTeacherDistillationTrainer(teachers={...})."
                    )
        if self.teacher_combination not in TEACHER_COMBINATIONS:
            raise ValueError(
                f"teacher_combination={self.teacher_combination!r} is not known; use one of {list(TEACHER_COMBINATIONS)}."
            )
        if self.teacher_weighting not in TEACHER_WEIGHTINGS:
            raise ValueError(
                f"teacher_weighting={self.teacher_weighting!r} is not known; use one of {list(TEACHER_WEIGHTINGS)}."
            )
        if self.route_weights is not None and self.teacher_combination != "route":
            raise ValueError(
                f"route_weights={self.route_weights!r} weighs routed rows, but teacher_combination="
                f"{self.teacher_combination!r} mixes every teacher on every row; use teacher_weights for that, or "
                "teacher_combination='route'."
            )
        if not self.confidence_temperature > 0:
            raise ValueError(
                f"confidence_temperature={self.confidence_temperature} must be > 0; use e.g. 1.0 (nats per token)."
            )
        if self.teachers is not None:
            self.check_against_teachers(list(self.teachers))
        self._check_cross_tokenizer_fields()
        unsupported = {
            "teacher_model_name_or_path": self.teacher_model_name_or_path is not None,
            "teacher_logits_path": self.teacher_logits_path is not None,
            "teacher_url": self.teacher_url is not None,
            "hidden_loss_weight": self.hidden_loss_weight > 0,
            "sparse_tail": self.sparse_tail != "bucket",
        }
        for name, is_set in unsupported.items():
            if is_set:
                raise ValueError(
                    f"{name}={getattr(self, name)!r} is a single-teacher setting; with several teachers give each one "
                    "in `teachers` (a hub id, folder, .gguf file or an http(s) URL of a served teacher) and leave "
                    f"{name} at its default."
                )

    def _check_cross_tokenizer_fields(self) -> None:
        if not self.cross_tokenizer:
            if self.loss_type in ("gold", "uld"):
                raise ValueError(
                    f"loss_type={self.loss_type!r} compares models across tokenizers; set cross_tokenizer=True (raw "
                    "text in, teachers aligned by spans) or use a same-tokenizer divergence such as 'forward_kl'."
                )
            return
        if self.loss_type not in CROSS_TOKENIZER_LOSS_TYPES:
            raise ValueError(
                f"loss_type={self.loss_type!r} is not available across tokenizers; use one of "
                f"{list(CROSS_TOKENIZER_LOSS_TYPES)} with cross_tokenizer=True."
            )
        self._check_cross_tokenizer_settings()
        if self.teacher_combination == "product":
            raise ValueError(
                "teacher_combination='product' multiplies distributions over one vocabulary, which teachers with "
                "different tokenizers do not share; use 'mixture' or 'route' with cross_tokenizer=True."
            )

    def check_against_teachers(self, names: list[str]) -> None:
        """Settings that name teachers (weights, device maps) checked against the teachers' names."""
        check_teacher_weights(self.teacher_weights, names)
        check_route_weights(self.route_weights, names)
        unknown = sorted(set(self.teacher_device_maps or {}) - set(names))
        if unknown:
            raise ValueError(f"teacher_device_maps names unknown teacher(s) {unknown}; the teachers are {names}.")

    def distillation_hyperparameters(self) -> dict[str, Any]:
        hyperparameters = super().distillation_hyperparameters()
        hyperparameters["teacher_combination"] = self.teacher_combination
        if self.route_weights:
            hyperparameters["route_weights"] = dict(self.route_weights)
        if self.cross_tokenizer:
            hyperparameters.update(cross_tokenizer=True, alignment=self.alignment, max_length=self.max_length)
        if self.teacher_combination != "route":
            hyperparameters["teacher_weighting"] = self.teacher_weighting
            if self.teacher_weighting == "confidence":
                hyperparameters["confidence_temperature"] = self.confidence_temperature
        return hyperparameters


def check_teacher_names(teachers: Any) -> None:
    """`teachers` must be a non-empty dict with non-empty string names."""
    if not isinstance(teachers, dict) or not teachers:
        raise ValueError(
            f"teachers={teachers!r} must be a non-empty dict of name -> teacher, e.g. "
            "{'python_docs': 'outputs/lora_python_docs/merged', 'fortunes': 'outputs/lora_fortunes/merged'}."
        )
    for name in teachers:
        if not isinstance(name, str) or not name.strip() or "/" in name:
            raise ValueError(
                f"teacher name {name!r} must be a non-empty string without '/' (it names metrics such as kd_loss/<name>)."
            )
