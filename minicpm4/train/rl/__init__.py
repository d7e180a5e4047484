"""Chunk-wise rollout RL (MINICPM4.md §7): rollouts on the engine, GRPO/DAPO objective, verifiable rewards."""
