"""Logit-level ensembles of checkpoints that share a tokenizer: causal LMs that work with `generate()`, and
sequence classifiers with voting or stacking. Causal LMs whose tokenizers differ ensemble too, at the level of text
pieces, with `EnsembleForCausalLM.from_members(..., cross_tokenizer=True)` (`generate()` only).

- :mod:`.combination`: the combination rules (pure functions over member log-probabilities).
- :mod:`.config`: :class:`EnsembleConfig` (what both ensembles save and load again).
- :mod:`.causal_lm`: :class:`EnsembleForCausalLM`, with one KV cache per member in an :class:`EnsembleCache`
  (:mod:`.cache`).
- :mod:`.speculative`: speculative ensemble decoding, `generate(proposer=..., num_draft_tokens=...)`.
- :mod:`.cross_tokenizer`: :class:`~hf_interop.ensemble.cross_tokenizer.CrossTokenizerEnsemble`, which generates for
  an ensemble built with `cross_tokenizer=True`.
- :mod:`.members`: member specs, checks before loading, token-map checks, loading and placement;
  :class:`LoraAdapterMember`.
- :mod:`.weights`: :func:`fit_ensemble_weights` (member weights by held-out NLL, PackLLM-style initialisation).
- :mod:`.classification`: :class:`EnsembleForSequenceClassification`.
- Ensembles trained as ensembles: :mod:`.bagging` (:class:`BaggingConfig`, :class:`BaggingTrainer`), :mod:`.boosting`
  (:class:`BoostingConfig`, :class:`BoostingTrainer`: SAMME, loss reweighting, additive product of experts), their
  pure math in :mod:`.resampling` and :mod:`.boosting_math`, the members' Trainer subclasses in
  :mod:`.weighted_trainer` and what both share in :mod:`.member_training`.
"""

from .cache import EnsembleCache
from .causal_lm import EnsembleForCausalLM
from .combination import COMBINATIONS, arithmetic, combine_log_probs, contrastive, maximum, mixture, product
from .config import EnsembleConfig
from .members import LoraAdapterMember, plan_member_placement
from .speculative import SpeculativeGenerateOutput, speculative_generate

__all__ = [
    "COMBINATIONS",
    "EnsembleCache",
    "EnsembleConfig",
    "EnsembleForCausalLM",
    "EnsembleForSequenceClassification",
    "LoraAdapterMember",
    "SpeculativeGenerateOutput",
    "arithmetic",
    "combine_log_probs",
    "contrastive",
    "fit_ensemble_weights",
    "maximum",
    "mixture",
    "plan_member_placement",
    "product",
    "speculative_generate",
]


def __getattr__(name: str):
    if name == "fit_ensemble_weights":
        from .weights import fit_ensemble_weights

        return fit_ensemble_weights
    if name == "EnsembleForSequenceClassification":
        from .classification import EnsembleForSequenceClassification

        return EnsembleForSequenceClassification
    raise AttributeError(f"module 'hf_interop.ensemble' has no attribute {name!r}")
