"""What bagging and boosting share: the config fields of ensemble training, and a base class that loads the base
model once, trains one member at a time (a LoRA adapter of the base by default, or a full copy), saves each finished
member atomically (a rerun skips finished members), builds the ensemble and writes its record and card.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from transformers import TrainingArguments

from ..logging_utils import get_logger
from ..utils import atomic_directory, atomic_write_json, last_complete_checkpoint
from .weighted_trainer import TASKS, SampleWeightedTrainer, WeightedExampleCollator

logger = get_logger(__name__)

MEMBERS_FOLDER = "trained_members"
RECORD_FILE = "ensemble_training.json"


@dataclass
class EnsembleTrainingConfig(TrainingArguments):
    r"""Fields shared by [`BaggingConfig`] and [`BoostingConfig`], on top of [`~transformers.TrainingArguments`] (which
    apply to every member: `max_steps`, `learning_rate`, batch sizes, ...). `output_dir` receives the ensemble; the
    members go to `output_dir/trained_members/member_NNN`.

    Args:
        task (`str`, *optional*):
            `"causal_lm"` or `"sequence_classification"`. Inferred from the training data when omitted: an integer
            `label`/`labels` column means classification.
        num_labels (`int`, *optional*):
            Classes of a classifier; defaults to `max(label) + 1` of the training data.
        use_lora (`bool`, *optional*, defaults to `True`):
            Train every member as a LoRA adapter of the one base model (the ensemble then holds the base weights
            once). `False` trains full copies.
        lora_r (`int`, *optional*, defaults to 8): LoRA rank; higher adds capacity and memory.
        lora_alpha (`float`, *optional*, defaults to 16): LoRA scale numerator (`lora_alpha / r`).
        lora_dropout (`float`, *optional*, defaults to 0.0): dropout on the adapter input.
        lora_target_modules (`list[str]`, *optional*): modules to adapt; every linear layer but the head by default.
    """

    task: str | None = field(default=None, metadata={"help": "causal_lm or sequence_classification (inferred)."})
    num_labels: int | None = field(default=None, metadata={"help": "Classes of a classifier (max label + 1)."})
    use_lora: bool = field(default=True, metadata={"help": "Members as LoRA adapters of one base (else full)."})
    lora_r: int = field(default=8, metadata={"help": "LoRA rank; higher adds capacity and memory."})
    lora_alpha: float = field(default=16, metadata={"help": "LoRA scale numerator (lora_alpha / r)."})
    lora_dropout: float = field(default=0.0, metadata={"help": "Dropout on the LoRA adapter input."})
    lora_target_modules: list[str] | None = field(
        default=None, metadata={"help": "Modules to adapt; every linear layer except the head by default."}
    )

    def __post_init__(self):
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"task={self.task!r} must be one of {TASKS} (or None to infer it from the data).")
        if self.num_labels is not None and (not isinstance(self.num_labels, int) or self.num_labels < 2):
            raise ValueError(f"num_labels={self.num_labels!r} must be an integer >= 2.")
        super().__post_init__()


def lora_config_for(model: nn.Module, args: EnsembleTrainingConfig, task: str) -> Any:
    """The members' `peft.LoraConfig`, its target modules checked against the base before any member trains.

    (`hf_interop.adapters.build_lora_config` sits in a layer above the ensembles, so the check is repeated here.)
    """
    from peft import LoraConfig

    targets = args.lora_target_modules
    if targets:
        names = [name for name, _ in model.named_modules() if name]
        missing = [target for target in targets if not any(n == target or n.endswith(f".{target}") for n in names)]
        if missing:
            linear = sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})
            raise ValueError(
                f"lora_target_modules entries {missing} match no module of {type(model).__name__}, so peft cannot wrap "
                f"it as asked; its linear layers are {linear}. Pass some of those, or None for all of them."
            )
    if not isinstance(args.lora_r, int) or args.lora_r < 1:
        raise ValueError(f"lora_r={args.lora_r!r} must be a positive integer (the LoRA rank), e.g. 8.")
    return LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules=list(targets) if targets else "all-linear",
        task_type="CAUSAL_LM" if task == "causal_lm" else "SEQ_CLS",
    )


def infer_task(dataset: Any, task: str | None) -> str:
    """The task of `dataset`: integer `label`/`labels` per example means a classifier, token lists a causal LM."""
    if task is not None:
        return task
    for column in ("labels", "label"):
        if column in dataset.column_names:
            value = dataset[0][column]
            return "sequence_classification" if isinstance(value, (int, np.integer)) else "causal_lm"
    return "causal_lm"


def check_train_dataset(dataset: Any, task: str, argument: str = "train_dataset") -> None:
    if dataset is None or len(dataset) == 0:
        raise ValueError(f"{argument} is empty; ensemble training needs at least one tokenized example.")
    if "input_ids" not in dataset.column_names:
        raise ValueError(f"{argument} has columns {dataset.column_names}; it needs tokenized `input_ids`.")
    if task == "sequence_classification" and not {"label", "labels"} & set(dataset.column_names):
        raise ValueError(f"{argument} has columns {dataset.column_names}; a classifier needs a `label` column.")
    if "sample_weight" in dataset.column_names:
        from .boosting_math import check_sample_weight

        check_sample_weight(dataset["sample_weight"], len(dataset), f"{argument} column 'sample_weight'")


def label_column(dataset: Any) -> str:
    return "labels" if "labels" in dataset.column_names else "label"


class EnsembleMemberTrainer:
    """Base of [`BaggingTrainer`] and [`BoostingTrainer`]: member loading, training, saving and the ensemble."""

    method = "ensemble"

    def __init__(
        self,
        model: str | os.PathLike,
        args: EnsembleTrainingConfig,
        train_dataset: Any,
        eval_dataset: Any = None,
        processing_class: Any = None,
    ):
        if not isinstance(model, (str, os.PathLike)):
            raise ValueError(
                f"model must be the folder (or hub id) of the base checkpoint, got a {type(model).__name__}; save the "
                "model first (model.save_pretrained(folder)) so the ensemble can record and reload it."
            )
        self.model_name_or_path = str(model)
        self.args = args
        self.task = infer_task(train_dataset, args.task)
        check_train_dataset(train_dataset, self.task)
        self.train_dataset = train_dataset
        self.eval_dataset = eval_dataset
        self.output_dir = Path(args.output_dir)
        self.members_dir = self.output_dir / MEMBERS_FOLDER
        if processing_class is None:
            from ..loading import load_tokenizer

            processing_class = load_tokenizer(self.model_name_or_path)
        self.tokenizer = processing_class
        if self.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before training.")
        self.num_labels = None
        if self.task == "sequence_classification":
            labels = np.asarray(train_dataset[label_column(train_dataset)])
            if labels.min() < 0:
                raise ValueError(f"labels must be >= 0; the training data holds {labels.min()}.")
            self.num_labels = args.num_labels or int(labels.max()) + 1
            if labels.max() >= self.num_labels:
                raise ValueError(f"labels reach {labels.max()} but num_labels={self.num_labels}; raise num_labels.")
        self.collator = WeightedExampleCollator(self.tokenizer.pad_token_id, self.task)
        self._base: nn.Module | None = None
        self.lora_config = None
        if args.use_lora:
            self.lora_config = lora_config_for(self.base_model(), args, self.task)

    # ----------------------------------------------------------------------------------------------------------
    # Members
    # ----------------------------------------------------------------------------------------------------------

    def base_model(self) -> nn.Module:
        """The base checkpoint, loaded once (members start from deep copies of it)."""
        if self._base is None:
            if self.task == "causal_lm":
                from ..loading import load_causal_lm

                self._base, _ = load_causal_lm(self.model_name_or_path, dtype=torch.float32, load_tokenizer_too=False)
            else:
                from transformers import AutoModelForSequenceClassification

                # The new classification head is drawn here: seeded by args.seed, and without touching the global
                # generator, so the same config gives the same head in any process (a resumed run included).
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(self.args.seed)
                    self._base = AutoModelForSequenceClassification.from_pretrained(
                        self.model_name_or_path,
                        num_labels=self.num_labels,
                        trust_remote_code=False,
                        use_safetensors=True,
                        dtype=torch.float32,
                    )
            if self._base.config.pad_token_id is None:
                self._base.config.pad_token_id = self.tokenizer.pad_token_id
        return self._base

    def member_dir(self, index: int) -> Path:
        return self.members_dir / f"member_{index:03d}"

    def member_is_saved(self, index: int) -> bool:
        folder = self.member_dir(index)
        return (folder / "adapter_config.json").is_file() or (folder / "config.json").is_file()

    def new_member(self, index: int) -> nn.Module:
        """A trainable member: a fresh LoRA adapter (seeded by `args.seed + index`) on a copy of the base, or a copy."""
        torch.manual_seed(self.args.seed + index)
        model = copy.deepcopy(self.base_model())
        model.train()
        if self.lora_config is None:
            return model
        from peft import get_peft_model

        return get_peft_model(model, copy.deepcopy(self.lora_config))

    def member_args(self, index: int) -> TrainingArguments:
        args = copy.deepcopy(self.args)
        args.output_dir = str(self.members_dir / f".work-member_{index:03d}")
        args.seed = self.args.seed + index
        return args

    def train_member(
        self, index: int, dataset: Any, trainer_class: type = SampleWeightedTrainer, **trainer_kwargs: Any
    ) -> nn.Module:
        """Train member `index` on `dataset` and save it atomically to `member_dir(index)`; returns the model."""
        model = self.new_member(index)
        args = self.member_args(index)
        trainer = trainer_class(
            model=model,
            args=args,
            train_dataset=dataset,
            data_collator=self.collator,
            task=self.task,
            **trainer_kwargs,
        )
        checkpoint = last_complete_checkpoint(args.output_dir)
        trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
        model.eval()
        self.save_member(model, index)
        shutil.rmtree(args.output_dir, ignore_errors=True)
        return model

    def save_member(self, model: nn.Module, index: int) -> Path:
        folder = self.member_dir(index)
        with atomic_directory(folder, overwrite=True) as tmp:
            model.save_pretrained(tmp)
            self.tokenizer.save_pretrained(tmp)
            if self.task == "sequence_classification":
                from .classification import LABELS_FILE

                config = model.config if self.lora_config is None else model.get_base_model().config
                atomic_write_json(
                    Path(tmp) / LABELS_FILE,
                    {"num_labels": self.num_labels, "id2label": {str(k): v for k, v in config.id2label.items()}},
                )
        return folder

    def load_member(self, index: int) -> nn.Module:
        """A saved member back as a standalone model (a LoRA adapter on a copy of the base)."""
        folder = str(self.member_dir(index))
        if self.lora_config is None:
            if self.task == "causal_lm":
                from ..loading import load_causal_lm

                return load_causal_lm(folder, dtype=torch.float32, load_tokenizer_too=False)[0]
            from transformers import AutoModelForSequenceClassification

            return AutoModelForSequenceClassification.from_pretrained(folder, use_safetensors=True).eval()
        from peft import PeftModel

        return PeftModel.from_pretrained(copy.deepcopy(self.base_model()), folder, is_trainable=False).eval()

    # ----------------------------------------------------------------------------------------------------------
    # The ensemble
    # ----------------------------------------------------------------------------------------------------------

    def build_ensemble(
        self, indices: list[int], weights: list[float] | None, combination: str = "mixture", voting: str = "soft"
    ) -> nn.Module:
        folders = [str(self.member_dir(index).resolve()) for index in indices]
        base = str(Path(self.model_name_or_path).resolve()) if os.path.isdir(self.model_name_or_path) else None
        base = base or self.model_name_or_path
        if self.task == "causal_lm":
            from .causal_lm import EnsembleForCausalLM

            if self.lora_config is not None:
                return EnsembleForCausalLM.from_lora_adapters(
                    base, folders, weights, combination, tokenizer=self.tokenizer, dtype="float32"
                )
            return EnsembleForCausalLM.from_members(folders, weights, combination, dtype="float32")
        from .classification import EnsembleForSequenceClassification

        if self.lora_config is not None:
            return EnsembleForSequenceClassification.from_lora_adapters(
                base, folders, voting, weights, tokenizer=self.tokenizer
            )
        return EnsembleForSequenceClassification.from_members(folders, voting, weights, tokenizer=self.tokenizer)

    def save_ensemble(self, ensemble: nn.Module, record: dict[str, Any], card: dict[str, Any]) -> None:
        """The ensemble (config, tokenizer), `ensemble_training.json` and a card naming method, weights and scores."""
        from .config import write_ensemble_card

        ensemble.save_pretrained(self.output_dir)
        atomic_write_json(self.output_dir / RECORD_FILE, record)
        weights = ensemble.member_weights.tolist()
        members = [
            {"name_or_path": spec["name_or_path"], "revision": spec.get("revision"), "weight": round(weight, 6)}
            for spec, weight in zip(ensemble.config.members, weights, strict=True)
        ]
        metadata = {"members": members, **card}
        if ensemble.config.lora_base_model:
            metadata["base_model"] = ensemble.config.lora_base_model["name_or_path"]
        write_ensemble_card(self.output_dir, metadata)

    def hyperparameters(self) -> dict[str, Any]:
        return {
            "task": self.task,
            "members": "LoRA adapters of one base" if self.lora_config is not None else "full models",
            "lora_r": self.args.lora_r if self.lora_config is not None else None,
            "max_steps per member": self.args.max_steps,
            "learning_rate (optimizer)": self.args.learning_rate,
            "per_device_train_batch_size": self.args.per_device_train_batch_size,
            "gradient_accumulation_steps": self.args.gradient_accumulation_steps,
            "seed": self.args.seed,
            "training record": RECORD_FILE,
        }

    # ----------------------------------------------------------------------------------------------------------
    # Member outputs over a dataset
    # ----------------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def member_outputs(self, models: list[nn.Module], dataset: Any, batch_size: int | None = None) -> dict:
        """Per member: class probabilities `(M, N, K)` (classifiers) or target log-probs `(M, N, T)` (causal LMs)."""
        batch_size = batch_size or self.args.per_device_eval_batch_size
        outputs: list[list[torch.Tensor]] = [[] for _ in models]
        target_masks, target_ids = [], []
        rows = [{key: dataset[i][key] for key in dataset.column_names} for i in range(len(dataset))]
        for start in range(0, len(rows), batch_size):
            batch = self.collator(rows[start : start + batch_size])
            for member, model in enumerate(models):
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
                if self.task == "sequence_classification":
                    outputs[member].append(torch.softmax(logits, -1))
                else:
                    targets = batch["labels"][:, 1:]
                    log_probs = torch.log_softmax(logits[:, :-1], -1)
                    outputs[member].append(log_probs.gather(-1, targets.clamp_min(0)[..., None]).squeeze(-1))
            if self.task == "causal_lm":
                target_masks.append(batch["labels"][:, 1:] != -100)
                target_ids.append(batch["labels"][:, 1:])
        if self.task == "sequence_classification":
            return {"probabilities": torch.stack([torch.cat(parts) for parts in outputs])}
        longest = max(mask.shape[1] for mask in target_masks)

        def pad(tensor: torch.Tensor, value: Any) -> torch.Tensor:
            return torch.nn.functional.pad(tensor, (0, longest - tensor.shape[1]), value=value)

        masks = torch.cat([pad(mask, False) for mask in target_masks])
        ids = torch.cat([pad(target, -100) for target in target_ids])
        num_bytes = [len(self.tokenizer.decode(row[row != -100].tolist()).encode("utf-8")) for row in ids]
        log_probs = torch.stack([torch.cat([pad(part, 0.0) for part in parts]) for parts in outputs])
        return {"target_log_probs": log_probs, "target_mask": masks, "num_bytes": num_bytes}


def read_training_record(folder: str | os.PathLike) -> dict[str, Any]:
    """The `ensemble_training.json` a bagged or boosted ensemble was saved with (method, samples, weights, scores)."""
    path = Path(folder) / RECORD_FILE
    if not path.is_file():
        raise ValueError(
            f"{str(folder)!r} has no {RECORD_FILE}; it was not written by BaggingTrainer/BoostingTrainer."
        )
    return json.loads(path.read_text(encoding="utf-8"))
