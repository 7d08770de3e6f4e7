"""The SFT recipe (recipe.py) and its curricula (phases, lr schedules, data streams)."""
