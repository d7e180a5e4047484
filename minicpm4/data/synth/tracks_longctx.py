"""Track 4, long context, LongAlign-style (MINICPM4.md §8.3): queries about one document answered over a
context of many documents in which it hides.

Per KB document d (default: the shipped survey KB), one record per query type (extraction, summary,
reasoning, open QA):
  1. the model writes a query of that type about d alone;
  2. a target length is drawn uniformly from --length-range; BM25 (bm25s) over the KB retrieves documents
     related to the query, and k grows until the k related documents plus d reach the target (random KB
     documents pad the context when retrieval runs dry: meta.random_fill counts them);
  3. d is inserted at a random position m in 1..k+1 ("Document m: ..."), the model answers with the full context.
Verification: the query and answer are non-empty, not refusals, not echoes, and share a content word with d
(one word only: borderline, for review); document m of the context is d; the context length lies in the range. Lengths are model tokens when the model runs in this process
(its tokenizer), else a characters/4 estimate (stats say which).

The report's contexts are 8K-64K tokens; the default range here, 1024-3072, fits the bundled ~3M model, whose
engine context is a few thousand tokens. Pass e.g. --length-range 8192,65536 for a real model.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from pathlib import Path

from minicpm4.data.synth.track import (Job, JobSteps, Request, TrackContext, assistant, check_reply, content_words,
                                       pick, reply_text, user)
from minicpm4.data.synth.tracks_knowledge import KB_PATH
from minicpm4.data.synth.verdict import Verdict

QUERY_TYPES = {
    "extraction": "question asking for a specific fact stated in the document",
    "summary": "request to summarise the document",
    "reasoning": "question that needs reasoning over what the document says",
    "open-qa": "open-ended question the document helps to answer",
}
DEFAULT_LENGTH_RANGE = (1024, 3072)
RETRIEVE_K = 256  # ranked candidates per query; enough for 64K-token contexts of ~200-token KB entries
INSTRUCTION = "Read the documents below and answer the question after them."


@dataclass
class LongContextConfig:
    kb_path: Path = KB_PATH
    length_range: tuple[int, int] = DEFAULT_LENGTH_RANGE
    query_types: tuple[str, ...] = tuple(QUERY_TYPES)
    max_query_chars: int = 500

    def __post_init__(self) -> None:
        lo, hi = self.length_range
        if not 0 < lo <= hi:
            raise ValueError(f"--length-range {lo},{hi}: expected 0 < MIN <= MAX")
        unknown = [t for t in self.query_types if t not in QUERY_TYPES]
        if unknown or not self.query_types:
            raise ValueError(f"query types: unknown {unknown}; choose from {', '.join(QUERY_TYPES)}")


def block(position: int, paper) -> str:
    return f"Document {position}: {paper.title}\n{paper.abstract}"


def context_prompt(papers: list, query: str) -> str:
    blocks = "\n\n".join(block(i, p) for i, p in enumerate(papers, 1))
    return f"{INSTRUCTION}\n\n{blocks}\n\nQuestion: {query}\nAnswer using the documents above."


def document_at(prompt: str, position: int) -> str | None:
    """The text of "Document <position>: ..." in a context prompt (up to the next document or the question)."""
    head = f"Document {position}: "
    start = prompt.find("\n\n" + head)
    if start < 0:
        return None
    start += 2
    end = min(i for i in (prompt.find("\n\nDocument ", start), prompt.find("\n\nQuestion: ", start), len(prompt))
              if i >= 0)
    return prompt[start:end]


class LongContextTrack:
    name = "longctx"

    def __init__(self, ctx: TrackContext, config: LongContextConfig | None = None) -> None:
        from minicpm4.apps.survey.kb import Bm25Index, load_kb

        self.ctx, self.config = ctx, config or LongContextConfig()
        self.docs = load_kb(self.config.kb_path)
        self.index = Bm25Index(self.docs)
        self.position = {p.id: i for i, p in enumerate(self.docs)}

    def info(self) -> dict:
        lo, hi = self.config.length_range
        return {"kb": str(self.config.kb_path), "documents": len(self.docs), "length_range": [lo, hi],
                "length_unit": self.ctx.length_unit, "query_types": list(self.config.query_types)}

    def jobs(self, limit: int | None) -> list[Job]:
        return [Job(self.name, d.id, self.config.query_types, partial(self._steps, doc=d))
                for d in pick(self.docs, limit, self.ctx.data_seed, self.name)]

    def gather(self, doc, query: str, target: int, rng) -> tuple[list, int, int]:
        """(papers in context order, m, random fill): grow k until the blocks reach `target` length, then put d
        at position m. Block lengths are summed (adding one block is additive up to a few tokens); the
        finished prompt is measured again by the verifier."""
        length = self.ctx.length
        used = length(context_prompt([doc], query))
        related = [self.docs[i] for i in self.index.search_one(f"{query} {doc.title}", RETRIEVE_K)
                   if self.docs[i].id != doc.id]
        others = [p for p in self.docs if p.id != doc.id]
        rng.shuffle(others)
        chosen, seen, fill = [], {doc.id}, 0
        pool = iter(related + others)
        while used < target:
            paper = next((p for p in pool if p.id not in seen), None)
            if paper is None:
                break
            seen.add(paper.id)
            fill += len(chosen) >= len(related)
            chosen.append(paper)
            used += length("\n\n" + block(len(chosen) + 1, paper))
        m = rng.randint(1, len(chosen) + 1)
        return chosen[:m - 1] + [doc] + chosen[m - 1:], m, fill

    def _steps(self, job: Job, doc) -> JobSteps:
        lo, hi = self.config.length_range
        asks = [(f"Here is a document:\n\n{doc.title}\n{doc.abstract}\n\nWrite one {QUERY_TYPES[t]} about this "
                 "document. Reply with the question only.") for t in job.variants]
        turns = yield [Request([user(a)]) for a in asks]
        source_words = content_words(f"{doc.title} {doc.abstract}")
        records, answering = [], []
        for qtype, ask, turn in zip(job.variants, asks, turns):
            query = reply_text(turn)
            verdict = check_reply(query, "", max_chars=self.config.max_query_chars, what="query")
            if verdict.ok and not content_words(query) & source_words:
                verdict = Verdict.failed("query not about the source document (no shared content word)")
            if not verdict.ok:
                records.append(job.record(qtype, [user(ask), assistant(query)], verdict, query=query))
                continue
            rng = self.ctx.rng(self.name, f"{doc.id}:{qtype}")
            target = rng.randint(lo, hi)
            papers, m, fill = self.gather(doc, query, target, rng)
            answering.append((qtype, query, context_prompt(papers, query), papers, m, target, fill))
        if answering:
            turns = yield [Request([user(a[2])]) for a in answering]
        for (qtype, query, prompt, papers, m, target, fill), turn in zip(answering, turns):
            answer = reply_text(turn)
            length = self.ctx.length(prompt)
            meta = {"query": query, "query_type": qtype, "position": m, "k": len(papers) - 1,
                    "documents": [p.id for p in papers], "length": length, "target_length": target,
                    "length_unit": self.ctx.length_unit, "random_fill": fill}
            verdict = check_reply(answer, query, what="answer")
            if verdict.ok and document_at(prompt, m) != block(m, doc):
                verdict = Verdict.failed(f"document {m} of the context is not the source document")
            if verdict.ok and not lo <= length <= hi:
                verdict = Verdict.failed(f"context length {length} outside {lo}..{hi}")
            shared = content_words(answer) & source_words
            if verdict.ok and not shared:
                verdict = Verdict.failed("answer not grounded in the source document (no shared content word)")
            if verdict.ok and len(shared) == 1:
                meta["borderline"] = f"answer shares one content word with the source document: {min(shared)!r}"
            records.append(job.record(qtype, [user(prompt), assistant(answer)], verdict, **meta))
        return records
