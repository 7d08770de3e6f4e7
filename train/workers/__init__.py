"""Ray actors and their placement: the DeepSpeed trainer group, rollout workers (HF, vLLM), the reference model,
reward workers; ray_session.py starts Ray for a driver."""
