"""``python -m train.eval``: evaluation of a checkpoint on a data set (pass@k, maj@k, lengths, truncation)."""
