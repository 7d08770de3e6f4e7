"""Run plumbing shared by every recipe: config checks, checkpoints, metrics logging (W&B, jsonl), report plots."""
