"""Models shared by SFT, RL, synthesis and evaluation: loading (model zoo), attention backends, packed forwards and
log-probs, the KV-cache sampling loop, held-out evaluation, device and precision."""
