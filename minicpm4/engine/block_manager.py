"""Paged KV bookkeeping: a pool of fixed-size pages, a block table per sequence, prefix reuse by hashing.

A page holds `block_size` consecutive positions of one sequence. A FULL page whose tokens all have
K/V is registered under a hash of (hash of the previous page, its tokens), so a later sequence with
the same prefix maps the same physical page instead of recomputing it (a repeated system prompt, a
preempted or resumed conversation). Pages are reference counted; a freed page keeps its hash and
content until it is handed out again (least recently freed first), so a prefix survives its
request. Shared pages are never written: a sequence only writes at positions >= its computed count,
and admission never reuses the page holding a prompt's last token (that token must be computed to
produce logits).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from minicpm4.engine.sequence import Sequence


def page_hash(previous: int | None, tokens: tuple[int, ...]) -> int:
    return hash((previous, tokens))


@dataclass
class Page:
    page_id: int
    ref_count: int = 0
    hash: int | None = None  # set once the page is full and computed
    tokens: tuple[int, ...] = ()  # the page's tokens when hashed (guards against hash collisions)


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pages = [Page(i) for i in range(num_blocks)]
        # Free pages, least recently freed first; hashed ones among them still serve prefix hits.
        self.free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self.by_hash: dict[int, int] = {}
        # Per sequence: hash of its last registered page, and how many pages are registered.
        self._chain: dict[int, tuple[int | None, int]] = {}

    # ---- capacity ---------------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return len(self.pages)

    @property
    def num_free(self) -> int:
        return len(self.free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def pages_needed(self, seq: Sequence, num_tokens: int) -> int:
        """New pages `seq` needs to hold K/V up to position num_computed_tokens + num_tokens - 1."""
        total = seq.num_computed_tokens + num_tokens
        return max(0, -(-total // self.block_size) - len(seq.block_table))

    def can_allocate(self, seq: Sequence, num_tokens: int) -> bool:
        return self.pages_needed(seq, num_tokens) <= self.num_free

    # ---- admission: prefix reuse --------------------------------------------------------------------
    def match_prefix(self, seq: Sequence) -> None:
        """Map the longest run of cached full pages of seq's tokens (never the one holding its last token)."""
        assert not seq.block_table and seq.num_computed_tokens == 0
        if not self.enable_prefix_caching:
            return
        bs, previous = self.block_size, None
        for start in range(0, (seq.num_tokens - 1) // bs * bs, bs):
            tokens = tuple(seq.token_ids[start:start + bs])
            h = page_hash(previous, tokens)
            page_id = self.by_hash.get(h)
            if page_id is None or self.pages[page_id].tokens != tokens:
                break
            self._take(page_id)
            seq.block_table.append(page_id)
            previous = h
        seq.num_computed_tokens = seq.num_cached_tokens = len(seq.block_table) * bs
        self._chain[id(seq)] = (previous, len(seq.block_table))

    # ---- growth and release ---------------------------------------------------------------------------
    def allocate(self, seq: Sequence, num_tokens: int) -> None:
        """Give seq the pages for its next num_tokens positions (caller checked can_allocate)."""
        for _ in range(self.pages_needed(seq, num_tokens)):
            page_id = next(iter(self.free))
            page = self.pages[page_id]
            if page.hash is not None:  # evict the cached prefix this page still held
                if self.by_hash.get(page.hash) == page_id:
                    del self.by_hash[page.hash]
                page.hash, page.tokens = None, ()
            self._take(page_id)
            seq.block_table.append(page_id)

    def commit(self, seq: Sequence) -> None:
        """Register seq's pages that became full and computed (after a step advanced num_computed_tokens)."""
        if not self.enable_prefix_caching:
            return
        previous, done = self._chain.get(id(seq), (None, 0))
        bs = self.block_size
        full = min(seq.num_computed_tokens, seq.num_tokens) // bs
        for index in range(done, full):
            tokens = tuple(seq.token_ids[index * bs:(index + 1) * bs])
            h = page_hash(previous, tokens)
            page = self.pages[seq.block_table[index]]
            if page.hash is None:
                page.hash, page.tokens = h, tokens
                self.by_hash.setdefault(h, page.page_id)
            previous = h
        self._chain[id(seq)] = (previous, max(done, full))

    def free_sequence(self, seq: Sequence) -> None:
        """Release seq's pages (finish, abort, preemption); cached content stays reusable."""
        for page_id in reversed(seq.block_table):  # tail first: the prefix is evicted last
            page = self.pages[page_id]
            page.ref_count -= 1
            assert page.ref_count >= 0, f"page {page_id} freed twice"
            if page.ref_count == 0:
                self.free[page_id] = None  # hashed pages join the end: their cached prefix is evicted last
                if page.hash is None:
                    self.free.move_to_end(page_id, last=False)  # unhashed pages are reused first
        seq.block_table = []
        seq.num_computed_tokens = 0
        self._chain.pop(id(seq), None)

    def _take(self, page_id: int) -> None:
        page = self.pages[page_id]
        if page.ref_count == 0:
            del self.free[page_id]
        page.ref_count += 1
