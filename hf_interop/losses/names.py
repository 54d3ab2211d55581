"""Names of the loss types each loss form accepts; torch-free, so building a config never imports the math."""

LOSS_TYPES = ("forward_kl", "reverse_kl", "jsd", "skew_kl", "skew_reverse_kl", "tvd", "mse")
SPARSE_LOSS_TYPES = ("forward_kl", "reverse_kl", "jsd", "tvd")
