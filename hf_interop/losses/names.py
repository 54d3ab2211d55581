"""Names of the loss types each loss form accepts; torch-free, so building a config never imports the math."""

LOSS_TYPES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd", "mse")
SPARSE_LOSS_TYPES = ("forward_kl", "reverse_kl", "jsd", "tvd")
# the per-layer hidden-state losses (`DistillationConfig.hidden_loss_type`; computed by the trainer)
HIDDEN_LOSS_TYPES = ("mse", "cosine")
