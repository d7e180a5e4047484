"""Speculative decoding (MINICPM4.md §4.2-4.4): drafts verified by the target in one forward, lossless.

    draft_model.py     the EAGLE-2 draft head in the MiniCPM4 Eagle format (load / save / from the MTP head)
    eagle.py           EAGLE-2 drafting: the draft's sliding-window KV, dynamic trees, FR-Spec head
    chain.py           chain drafting with a separate small MiniCPM model
    tree.py            tree shapes, candidate history, top-(tree_size - 1) selection, pruning
    tree_attention.py  the target side: tree rows through the paged kernel under ancestor masks, KV commit
    tree_sparse.py     the target side with InfLLM v2: per-node block selection incl. the path's windows
    verify.py          acceptance: the target's sampler walks the tree (CPM.cu's sample-then-match rule)
    config.py          SpeculativeConfig (what `--draft`, `--frspec`, `--tree-size` set)
    build.py           the drafter a SpeculativeConfig describes

The engine (engine/llm_engine.py) drafts, the runner (engine/runner.py) verifies; the FR-Spec index is built by
`minicpm4 frspec-index` (data/frspec.py) and draft heads are trained by `minicpm4 train draft` (train/draft.py).
"""
