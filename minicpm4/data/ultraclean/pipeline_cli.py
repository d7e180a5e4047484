"""`minicpm4 data ultraclean pipeline`: the UltraClean datatrove pipeline (pipeline.py) from the command line.

    minicpm4 data ultraclean pipeline --model quality.bin --input DIR_OR_GLOB --out DIR --logging-dir DIR \\
        --tasks N --workers W [--threshold 0.5] [--executor local|slurm|ray] [--dedup] [--rejected DIR]

Run the same command again with the same --logging-dir to resume: finished tasks are skipped.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _key_value(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"{value}: expected KEY=VALUE, e.g. account=myproject")
    return key.strip(), val.strip()


# pipeline.ExecutorConfig's defaults, spelled out so that building the CLI does not import datatrove (an optional
# dependency); tests/test_ultraclean_pipeline.py checks they agree.
DEFAULTS = argparse.Namespace(kind="local", tasks=1, workers=-1, cpus_per_task=1, mem_per_cpu_gb=2, time="24:00:00",
                              qos="normal", job_name="ultraclean")


def register_pipeline(inner: argparse._SubParsersAction) -> None:
    d = DEFAULTS
    p = inner.add_parser("pipeline", help="score + filter JSONL shards as a datatrove pipeline (local, Slurm, Ray)",
                         description=__doc__.split("\n\n")[0], epilog="executors: local runs the tasks in a process pool here; slurm submits an sbatch "
                         "job array (run it on a login node, with input, output and logging dir on a filesystem every "
                         "node sees); ray runs them on a running Ray cluster (pip install ray). Re-run the same "
                         "command with the same --logging-dir to resume. More: minicpm4/data/ultraclean/pipeline.py.")
    p.add_argument("--model", required=True, type=Path, metavar="FILE", help="the fastText model (.bin)")
    p.add_argument("--input", required=True, metavar="DIR_OR_GLOB",
                   help="a JSONL file, a folder (every *.jsonl* under it) or a glob; documents need 'text'")
    p.add_argument("--out", required=True, type=Path, metavar="DIR", help="kept documents, one NNNNN.jsonl per task")
    p.add_argument("--logging-dir", required=True, type=Path, metavar="DIR",
                   help="datatrove's logs, stats and completion markers (reuse it to resume)")
    p.add_argument("--tasks", type=int, default=d.tasks, help="datatrove tasks; input files are split among them "
                   "(default: %(default)s)")
    p.add_argument("--workers", type=int, default=d.workers, help="tasks at once; -1: all (default: %(default)s)")
    p.add_argument("--threshold", type=float, default=0.5, help="keep score >= this (default: %(default)s)")
    p.add_argument("--field", default="quality", help="name of the score field written (default: %(default)s)")
    p.add_argument("--rejected", type=Path, default=None, metavar="DIR", help="also write the dropped documents")
    p.add_argument("--dedup", action="store_true", help="drop exact duplicates first (datatrove's 3-stage dedup)")
    p.add_argument("--batch-size", type=int, default=512, help="documents per predict() call (default: %(default)s)")
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="default: the bundled default model's")
    p.add_argument("--executor", choices=["local", "slurm", "ray"], default=d.kind, help="default: %(default)s")
    g = p.add_argument_group("Slurm and Ray resources per task")
    g.add_argument("--cpus-per-task", type=int, default=d.cpus_per_task, help="default: %(default)s")
    g.add_argument("--mem-per-cpu-gb", type=int, default=d.mem_per_cpu_gb, help="default: %(default)s")
    g = p.add_argument_group("Slurm (--executor slurm)")
    g.add_argument("--partition", default=None, help="required with slurm")
    g.add_argument("--time", default=d.time, help="per array task (default: %(default)s)")
    g.add_argument("--qos", default=d.qos, help="default: %(default)s")
    g.add_argument("--job-name", default=d.job_name, help="default: %(default)s (+ the stage name)")
    g.add_argument("--venv-path", default=None, metavar="FILE",
                   help="activate script sourced in the job (default: this Python's venv, when it is one)")
    g.add_argument("--sbatch-arg", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="extra #SBATCH --KEY=VALUE line, repeatable (account, constraint, ...)")
    g = p.add_argument_group("Ray (--executor ray)")
    g.add_argument("--ray-address", default=None, help="ray.init(address=...): default RAY_ADDRESS or a local cluster")
    p.set_defaults(func=cmd_pipeline)


def _default_venv() -> str | None:
    activate = Path(sys.prefix) / "bin" / "activate"
    return str(activate) if sys.prefix != sys.base_prefix and activate.is_file() else None


def _tokenizer_dir(a: argparse.Namespace) -> Path:
    from minicpm4.api import DEFAULT_MODEL_DIR

    return Path(a.tokenizer) if a.tokenizer else DEFAULT_MODEL_DIR


def cmd_pipeline(a: argparse.Namespace) -> None:
    try:
        from minicpm4.data.ultraclean.pipeline import ExecutorConfig, PipelineConfig, run_pipeline
    except ImportError as e:
        from minicpm4.errors import MissingDependency

        raise MissingDependency("the UltraClean pipeline", "datatrove", "data") from e

    cfg = PipelineConfig(model=a.model, input=a.input, out_dir=a.out, tokenizer_dir=_tokenizer_dir(a),
                         threshold=a.threshold, rejected_dir=a.rejected, dedup=a.dedup, field=a.field,
                         batch_size=a.batch_size)
    ecfg = ExecutorConfig(kind=a.executor, tasks=a.tasks, workers=a.workers, logging_dir=a.logging_dir,
                          cpus_per_task=a.cpus_per_task, mem_per_cpu_gb=a.mem_per_cpu_gb, partition=a.partition,
                          time=a.time, qos=a.qos, job_name=a.job_name, venv_path=a.venv_path or _default_venv(),
                          sbatch_args=tuple(a.sbatch_arg), ray_address=a.ray_address)
    counts = run_pipeline(cfg, ecfg)
    if a.executor == "slurm":
        print(f"submitted; progress: {a.logging_dir}/score/completions, kept documents -> {a.out}")
        return
    print(f"kept {counts['kept']} of {counts['documents']} documents (score >= {a.threshold}) over "
          f"{counts['tasks_done']}/{a.tasks} tasks -> {a.out}")
