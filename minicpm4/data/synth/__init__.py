"""UltraChat v2-style SFT data synthesis (MINICPM4.md §8.3): tracks, verifiers, near-duplicate removal."""
