"""UltraClean (MINICPM4.md §8.1): fastText quality classification of pre-training documents."""
