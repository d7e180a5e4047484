"""UltraClean as a datatrove pipeline (MINICPM4.md §8.1): read JSONL shards, optionally drop exact duplicates,
score every document with the fastText quality classifier, keep score >= threshold, write the kept (and
optionally the rejected) documents. The same steps run on one machine, a Slurm cluster or a Ray cluster; only
`--executor` changes:

    # one machine: 8 tasks (one per input shard at least), 4 at a time
    minicpm4 data ultraclean pipeline --model quality.bin --input raw/ --out kept/ --logging-dir logs/uc \\
        --tasks 8 --workers 4
    # Slurm: the same command submits a job array (one array task per datatrove task) with `sbatch`; run it on
    # a login node; logging dir, input and output must sit on a filesystem every node sees
    minicpm4 data ultraclean pipeline ... --executor slurm --partition cpu --time 04:00:00 --cpus-per-task 2 \\
        --mem-per-cpu-gb 4 [--venv-path .venv/bin/activate] [--sbatch-arg account=proj]
    # Ray: connects to a running cluster (`ray start --head`, or RAY_ADDRESS / --ray-address) and runs each task
    # as a Ray task; needs `pip install ray` (imported only here)
    minicpm4 data ultraclean pipeline ... --executor ray [--ray-address auto] --cpus-per-task 2

Resuming: datatrove writes `completions/NNNNN` under the logging dir when a task finishes and skips those tasks
next time, so re-running the same command after a crash, a kill or a Slurm pre-emption redoes only the
unfinished tasks (an unfinished task rewrites its own output file from the start). Keep --tasks and --input the
same when resuming: `run.json` in the logging dir records them and a different run is refused.

Input sharding is by file (task r reads files r, r+N, r+2N, ... in sorted order), so use at least as many input
files as tasks. Output: OUT/NNNNN.jsonl per task, flat records with the input's fields plus "quality".
With `dedup`, datatrove's three-stage exact deduplication (signatures -> find duplicates -> filter, hashing with
sha1 so nothing beyond the standard install is needed) runs first; its state lives under the logging dir.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from datatrove.data import Document, DocumentsPipeline
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.pipeline.readers.base import BaseDiskReader
from datatrove.pipeline.writers.disk_base import DiskWriter
from datatrove.utils.batching import batched

from minicpm4.errors import UserError

Executor = Literal["local", "slurm", "ray"]
FILTER_NAME = "UltraClean quality >= threshold"


@dataclass(frozen=True)
class PipelineConfig:
    model: Path  # the fastText .bin from `minicpm4 data ultraclean train`
    input: str  # a JSONL file, a folder (every *.jsonl* below it) or a glob
    out_dir: Path
    tokenizer_dir: Path  # the tokenizer the classifier was trained with
    threshold: float = 0.5
    rejected_dir: Path | None = None  # also write the documents scoring below the threshold
    dedup: bool = False
    field: str = "quality"
    batch_size: int = 512  # documents per fastText predict() call


@dataclass(frozen=True)
class ExecutorConfig:
    kind: Executor = "local"
    tasks: int = 1
    workers: int = -1  # tasks running at once; -1: all
    logging_dir: Path = Path("build/logs/ultraclean")
    # Slurm and Ray: resources per task
    cpus_per_task: int = 1
    mem_per_cpu_gb: int = 2
    # Slurm only
    partition: str | None = None
    time: str = "24:00:00"
    qos: str = "normal"
    job_name: str = "ultraclean"
    venv_path: str | None = None  # `source`d in the job script
    sbatch_args: tuple[tuple[str, str], ...] = ()
    # Ray only
    ray_address: str | None = None


# ---------------------------------------------------------------- our steps


class QualityScorer(PipelineStep):
    """Adds metadata[field] = the classifier's probability of high quality. The fastText model and tokenizer are
    loaded once per task, in the task's own process (a fastText model cannot be pickled to a worker)."""

    type = "🧹 - ULTRACLEAN"
    name = "🎯 fastText quality score"

    def __init__(self, model: str | Path, tokenizer_dir: str | Path, field: str = "quality", batch_size: int = 512):
        super().__init__()
        self.model, self.tokenizer_dir = str(model), str(tokenizer_dir)
        self.field, self.batch_size = field, batch_size
        self._classifier = None

    def __getstate__(self):
        return {**self.__dict__, "_classifier": None}

    def classifier(self):
        if self._classifier is None:
            from minicpm4.data.ultraclean.classifier import QualityClassifier
            from minicpm4.tokenizer import Tokenizer

            self._classifier = QualityClassifier.load(self.model, Tokenizer.from_pretrained(self.tokenizer_dir))
        return self._classifier

    def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
        for batch in batched(data, self.batch_size):
            with self.track_time("batch"):
                scores = self.classifier().scores(doc.text for doc in batch)
            for doc, score in zip(batch, scores):
                doc.metadata[self.field] = score
                self.stat_update("scored")
                yield doc


class QualityThresholdFilter(BaseFilter):
    """Keeps documents whose score is >= threshold: the decision is classifier.keep's, the one `filter` uses."""

    name = f"🎚 {FILTER_NAME}"

    def __init__(self, threshold: float = 0.5, field: str = "quality", exclusion_writer: DiskWriter | None = None,
                 batch_size: int = 512):
        super().__init__(exclusion_writer, batch_size)
        self.threshold, self.field = threshold, field

    def filter(self, doc: Document) -> bool:
        return self.filter_batch([doc])[0]

    def filter_batch(self, batch: list[Document]) -> list[bool]:
        from minicpm4.data.ultraclean.classifier import keep

        missing = next((d for d in batch if self.field not in d.metadata), None)
        if missing is not None:
            raise ValueError(f"document {missing.id}: no metadata['{self.field}']; put QualityScorer first")
        return keep([d.metadata[self.field] for d in batch], self.threshold)


# ---------------------------------------------------------------- JSONL in and out


def split_input(spec: str) -> tuple[str, str]:
    """(folder, glob relative to it) for a file, a folder or a glob such as data/*/part-*.jsonl."""
    path = Path(spec)
    if path.is_file():
        return str(path.parent), path.name
    if path.is_dir():
        return str(path), "**/*.jsonl*"
    parts = path.parts
    first_magic = next((i for i, p in enumerate(parts) if any(c in p for c in "*?[")), len(parts))
    return str(Path(*parts[:first_magic]) if first_magic else Path(".")), "/".join(parts[first_magic:])


def input_files(spec: str) -> list[str]:
    from datatrove.io import get_datafolder

    folder, pattern = split_input(spec)
    if not pattern or not Path(folder).is_dir():
        raise UserError(f"--input {spec}: no such file, folder or glob")
    files = get_datafolder(folder).list_files(glob_pattern=pattern)
    if not files:
        raise UserError(f"--input {spec}: matches no files")
    return files


def jsonl_reader(spec: str) -> BaseDiskReader:
    folder, pattern = split_input(spec)
    from datatrove.pipeline.readers import JsonlReader

    return JsonlReader(folder, glob_pattern=pattern, add_file_path=False)


def jsonl_writer(folder: str | Path) -> DiskWriter:
    # expand_metadata: flat records ({"text", "id", ..., "quality"}) like the other ultraclean commands write
    from datatrove.pipeline.writers import JsonlWriter

    return JsonlWriter(str(folder), output_filename="${rank}.jsonl", compression=None, expand_metadata=True)


# ---------------------------------------------------------------- stages and executors


@dataclass
class Stage:
    name: str  # also its logging sub-folder
    steps: list[PipelineStep]
    tasks: int


def _document_text(doc: Document) -> str:
    return doc.text


def ultraclean_stages(cfg: PipelineConfig, tasks: int, logging_dir: Path) -> list[Stage]:
    """The stages in order; each one runs after the one before it has finished every task."""
    stages: list[Stage] = []
    head: list[PipelineStep] = [jsonl_reader(cfg.input)]
    if cfg.dedup:
        from datatrove.pipeline.dedup import ExactDedupConfig, ExactDedupFilter, ExactDedupSignature, ExactFindDedups
        from datatrove.utils.hashing import HashConfig

        dd = ExactDedupConfig(content_getter=_document_text, hash_config=HashConfig(hash_fc="sha1"))
        sigs, dups = str(logging_dir / "dedup-data" / "signatures"), str(logging_dir / "dedup-data" / "duplicates")
        stages.append(Stage("dedup-signatures", [jsonl_reader(cfg.input), ExactDedupSignature(sigs, dd)], tasks))
        stages.append(Stage("dedup-find", [ExactFindDedups(sigs, dups, dd)], 1))
        head.append(ExactDedupFilter(dups, dd))  # stage 3 re-reads the input exactly as stage 1 did
    rejected = jsonl_writer(cfg.rejected_dir) if cfg.rejected_dir else None
    stages.append(Stage("score", [*head, QualityScorer(cfg.model, cfg.tokenizer_dir, cfg.field, cfg.batch_size),
                                  QualityThresholdFilter(cfg.threshold, cfg.field, rejected, cfg.batch_size),
                                  jsonl_writer(cfg.out_dir)], tasks))
    return stages


def make_executor(stage: Stage, ecfg: ExecutorConfig, depends=None):
    """One datatrove executor for a stage; `depends` is the executor of the stage before (run/submitted first)."""
    logging_dir = str(ecfg.logging_dir / stage.name)
    workers = stage.tasks if ecfg.workers in (-1, 0) else min(ecfg.workers, stage.tasks)
    if ecfg.kind == "local":
        from datatrove.executor import LocalPipelineExecutor

        return LocalPipelineExecutor(stage.steps, tasks=stage.tasks, workers=workers, logging_dir=logging_dir,
                                     depends=depends)
    if ecfg.kind == "slurm":
        from datatrove.executor import SlurmPipelineExecutor

        if not ecfg.partition:
            raise UserError("--partition: required with --executor slurm")
        return SlurmPipelineExecutor(
            stage.steps, tasks=stage.tasks, workers=-1 if ecfg.workers == -1 else workers, time=ecfg.time,
            partition=ecfg.partition, cpus_per_task=ecfg.cpus_per_task, mem_per_cpu_gb=ecfg.mem_per_cpu_gb,
            qos=ecfg.qos, job_name=f"{ecfg.job_name}-{stage.name}", venv_path=ecfg.venv_path,
            sbatch_args=dict(ecfg.sbatch_args) or None, logging_dir=logging_dir, depends=depends)
    if ecfg.kind == "ray":
        if importlib.util.find_spec("ray") is None:
            raise UserError("--executor ray: needs the 'ray' package (pip install ray), not installed here")
        from datatrove.executor.ray import RayPipelineExecutor

        return RayPipelineExecutor(stage.steps, tasks=stage.tasks, workers=workers, logging_dir=logging_dir,
                                   cpus_per_task=ecfg.cpus_per_task, mem_per_cpu_gb=ecfg.mem_per_cpu_gb,
                                   depends=depends)
    raise UserError(f"--executor {ecfg.kind}: choose from local, slurm, ray")


def chain_executors(stages: list[Stage], ecfg: ExecutorConfig):
    """The last stage's executor, each stage depending on the one before: running it runs (local, Ray) or
    submits (Slurm, with afterok dependencies) them all, skipping tasks already completed."""
    executor = None
    for stage in stages:
        executor = make_executor(stage, ecfg, depends=executor)
    return executor


def check_run_settings(cfg: PipelineConfig, ecfg: ExecutorConfig) -> None:
    """Refuse to resume into a logging dir written by a run with other inputs or task counts: datatrove would skip
    its completed tasks and leave outputs that mix the two runs."""
    from minicpm4.io import write_text_atomic

    settings = {"input": cfg.input, "tasks": ecfg.tasks, "model": str(cfg.model), "threshold": cfg.threshold,
                "dedup": cfg.dedup, "out_dir": str(cfg.out_dir)}
    path = ecfg.logging_dir / "run.json"
    if path.is_file():
        before = json.loads(path.read_text(encoding="utf-8"))
        changed = sorted(k for k in settings if before.get(k) != settings[k])
        if changed:
            raise UserError(f"--logging-dir {ecfg.logging_dir}: holds a run with other {', '.join(changed)} "
                            f"({', '.join(f'{k}={before.get(k)!r}' for k in changed)}); use a new logging dir")
    write_text_atomic(path, json.dumps(settings, indent=2) + "\n")


def validate(cfg: PipelineConfig, ecfg: ExecutorConfig) -> list[str]:
    """Check what a user can get wrong before any task starts; the input files."""
    if not Path(cfg.model).is_file():
        raise UserError(f"--model {cfg.model}: no such file")
    if not Path(cfg.tokenizer_dir).is_dir():
        raise UserError(f"--tokenizer {cfg.tokenizer_dir}: not a folder")
    if not 0.0 <= cfg.threshold <= 1.0:
        raise UserError(f"--threshold: must be in [0, 1], got {cfg.threshold}")
    if ecfg.tasks < 1:
        raise UserError(f"--tasks {ecfg.tasks}: expected >= 1")
    if ecfg.workers == 0 or ecfg.workers < -1:
        raise UserError(f"--workers {ecfg.workers}: expected >= 1 (or -1: all tasks at once)")
    return input_files(cfg.input)


def run_pipeline(cfg: PipelineConfig, ecfg: ExecutorConfig) -> dict:
    """Validate, record the run settings, run (or submit) every stage; the kept/total counts when they are known
    (local runs), from the per-task stats datatrove writes."""
    validate(cfg, ecfg)
    check_run_settings(cfg, ecfg)
    if ecfg.kind == "ray":
        import ray

        if not ray.is_initialized():
            ray.init(address=ecfg.ray_address)
    chain_executors(ultraclean_stages(cfg, ecfg.tasks, ecfg.logging_dir), ecfg).run()
    return task_counts(ecfg.logging_dir / "score")


def task_counts(stage_logging_dir: Path) -> dict:
    """{"tasks_done", "documents", "kept"} summed over the completed tasks' stats files of the scoring stage."""
    done = documents = kept = 0
    for stats_file in sorted((stage_logging_dir / "stats").glob("*.json")):
        done += 1
        for step in json.loads(stats_file.read_text(encoding="utf-8")):
            if FILTER_NAME in step.get("name", ""):
                stats = step.get("stats", {})
                documents += _metric_total(stats.get("total"))
                kept += _metric_total(stats.get("forwarded"))
    return {"tasks_done": done, "documents": documents, "kept": kept}


def _metric_total(value) -> int:
    return int(value.get("total", 0)) if isinstance(value, dict) else int(value or 0)


__all__ = ["ExecutorConfig", "PipelineConfig", "QualityScorer", "QualityThresholdFilter", "Stage",
           "chain_executors", "make_executor", "run_pipeline", "task_counts", "ultraclean_stages"]
