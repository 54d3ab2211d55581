"""Names of the loss types each loss form accepts; torch-free, so building a config never imports the math."""

LOSS_TYPES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd", "mse")
SPARSE_LOSS_TYPES = ("forward_kl", "reverse_kl", "jsd", "tvd")
# the per-layer hidden-state losses (`DistillationConfig.hidden_loss_type`; computed by the trainer)
HIDDEN_LOSS_TYPES = ("mse", "cosine")
# how the chunked losses compute each chunk (`DistillationConfig.loss_backend`; see `losses/compiled.py`)
LOSS_BACKENDS = ("auto", "eager", "compiled", "liger")
# the divergences Liger-Kernel fuses with the head matmul (`losses/liger.py`): its generalized JSD, which is forward
# KL at beta 0 and reverse KL at beta 1
LIGER_LOSS_TYPES = ("forward_kl", "reverse_kl", "jsd")
