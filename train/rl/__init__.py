"""The RL recipe (GRPO family, AAPO, Bingo): the driver and the parts of its step."""
