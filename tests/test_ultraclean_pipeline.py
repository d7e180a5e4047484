"""The UltraClean datatrove pipeline (minicpm4/data/ultraclean/pipeline.py): its output is exactly what
QualityClassifier + keep() retain; a run with a failing task resumes without redoing finished tasks; exact dedup
and the CLI; Slurm submission through a fake `sbatch` that runs the array tasks here; Ray when installed."""

from __future__ import annotations

import json
import os
import stat
import sys
from pathlib import Path

import pytest

pytest.importorskip("fasttext", reason="the UltraClean classifier needs fasttext-numpy2")
pytest.importorskip("datatrove", reason="the UltraClean pipeline needs datatrove")

from datatrove.data import Document  # noqa: E402
from datatrove.pipeline.base import PipelineStep  # noqa: E402

from minicpm4.cli import main  # noqa: E402
from minicpm4.data.ultraclean.classifier import FastTextConfig, QualityClassifier, balanced_negatives, keep  # noqa: E402
from minicpm4.data.ultraclean.pipeline import (ExecutorConfig, PipelineConfig, QualityThresholdFilter,  # noqa: E402
                                               chain_executors, make_executor, run_pipeline, ultraclean_stages)
from minicpm4.errors import UserError  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
KB = ROOT / "minicpm4" / "assets" / "survey-kb" / "kb.jsonl"
POOL = ROOT / "tests" / "fixtures" / "ultraclean_pool.jsonl"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A small classifier (dim 32: fast, still separates the two sources) and 80 unseen documents in 4 files."""
    from minicpm4.api import DEFAULT_MODEL_DIR
    from minicpm4.tokenizer import Tokenizer

    tmp = tmp_path_factory.mktemp("ultraclean-pipeline")
    kb = [json.loads(line)["abstract"] for line in KB.read_text().splitlines()]
    pool = [json.loads(line)["text"] for line in POOL.read_text().splitlines()]
    tokenizer = Tokenizer.from_pretrained(DEFAULT_MODEL_DIR)
    clf = QualityClassifier.train(kb[:300], balanced_negatives(pool[:300], 300, 0), tokenizer,
                                  FastTextConfig(dim=32, threads=1))
    clf.save(tmp / "q.bin")
    docs = [{"id": f"kb{i}", "text": t} for i, t in enumerate(kb[300:340])] + \
           [{"id": f"cl{i}", "text": t} for i, t in enumerate(pool[300:340])]
    inputs = tmp / "in"
    inputs.mkdir()
    for shard in range(4):
        (inputs / f"part{shard}.jsonl").write_text("".join(json.dumps(d) + "\n" for d in docs[shard::4]))
    scores = dict(zip((d["id"] for d in docs), clf.scores(d["text"] for d in docs)))
    expected = {i for i, k in zip(scores, keep(list(scores.values()), 0.5)) if k}
    assert 0 < len(expected) < len(docs)
    return {"tmp": tmp, "model": tmp / "q.bin", "tokenizer": DEFAULT_MODEL_DIR, "input": inputs, "docs": docs,
            "scores": scores, "expected": expected}


def _records(folder: Path) -> list[dict]:
    return [json.loads(line) for f in sorted(folder.glob("*.jsonl")) for line in f.read_text().splitlines()]


def _config(setup, out: Path, **kw) -> PipelineConfig:
    return PipelineConfig(model=setup["model"], input=str(setup["input"]), out_dir=out,
                          tokenizer_dir=setup["tokenizer"], **kw)


def test_output_is_exactly_what_the_classifier_keeps(setup, tmp_path):
    cfg = _config(setup, tmp_path / "kept", rejected_dir=tmp_path / "rejected")
    counts = run_pipeline(cfg, ExecutorConfig(tasks=4, workers=2, logging_dir=tmp_path / "logs"))
    kept, rejected = _records(tmp_path / "kept"), _records(tmp_path / "rejected")
    assert {r["id"] for r in kept} == setup["expected"] and len(kept) == len(setup["expected"])
    assert {r["id"] for r in rejected} == {d["id"] for d in setup["docs"]} - setup["expected"]
    for r in kept + rejected:
        assert r["quality"] == pytest.approx(setup["scores"][r["id"]], abs=1e-6)
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == [f"{r:05d}.jsonl" for r in range(4)]
    assert counts == {"tasks_done": 4, "documents": 80, "kept": len(setup["expected"])}


class RecordRunsAndFailOnce(PipelineStep):
    """Test-only last step: appends its rank to a log, and in `fail_rank` raises after the writer has finished,
    the first time only (as a task killed before datatrove marks it complete)."""

    name = "test: record runs, fail once"

    def __init__(self, log: Path, fail_rank: int, marker: Path):
        super().__init__()
        self.log, self.fail_rank, self.marker = log, fail_rank, marker

    def run(self, data, rank: int = 0, world_size: int = 1):
        with open(self.log, "a") as f:
            f.write(f"{rank}\n")
        yield from data
        if rank == self.fail_rank and not self.marker.exists():
            self.marker.touch()
            raise RuntimeError(f"task {rank} killed")


def test_a_failed_run_resumes_without_redoing_finished_tasks(setup, tmp_path):
    cfg, out, runs = _config(setup, tmp_path / "kept"), tmp_path / "kept", tmp_path / "runs.txt"
    ecfg = ExecutorConfig(tasks=4, workers=1, logging_dir=tmp_path / "logs")  # one at a time: a fixed order

    def execute():
        stages = ultraclean_stages(cfg, ecfg.tasks, ecfg.logging_dir)
        stages[-1].steps.append(RecordRunsAndFailOnce(runs, fail_rank=2, marker=tmp_path / "failed-once"))
        chain_executors(stages, ecfg).run()

    with pytest.raises(RuntimeError, match="task 2 killed"):
        execute()
    assert sorted(p.name for p in (ecfg.logging_dir / "score" / "completions").iterdir()) == ["00000", "00001"]
    before = {r: (out / f"{r:05d}.jsonl").stat() for r in (0, 1)}
    execute()
    assert runs.read_text().split() == ["0", "1", "2", "2", "3"]  # tasks 0 and 1 ran once
    for r, st in before.items():
        now = (out / f"{r:05d}.jsonl").stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns)
    assert {r["id"] for r in _records(out)} == setup["expected"]


def test_cli_with_dedup_resume_and_changed_settings(setup, tmp_path, capsys):
    inputs = tmp_path / "in"
    inputs.mkdir()
    for f in setup["input"].iterdir():
        (inputs / f.name).write_text(f.read_text())
    (inputs / "part4.jsonl").write_text((inputs / "part0.jsonl").read_text())  # every document of part0 twice
    def args(tasks="2", input_=str(inputs / "*.jsonl")):
        return ["data", "ultraclean", "pipeline", "--model", str(setup["model"]), "--input", input_,
                "--out", str(tmp_path / "kept"), "--logging-dir", str(tmp_path / "logs"), "--tasks", tasks,
                "--workers", "1", "--dedup", "--tokenizer", str(setup["tokenizer"])]

    assert main(args()) == 0, capsys.readouterr().err
    ids = [r["id"] for r in _records(tmp_path / "kept")]
    assert sorted(ids) == sorted(setup["expected"])  # duplicates gone
    summary = f"kept {len(ids)} of 80 documents (score >= 0.5) over 2/2 tasks"
    assert summary in capsys.readouterr().out
    assert main(args()) == 0 and summary in capsys.readouterr().out  # nothing left to do, same totals
    assert main(args(tasks="3")) == 2
    assert "holds a run with other tasks (tasks=2)" in capsys.readouterr().err
    assert main(args(input_=str(tmp_path / "none*.jsonl"))) == 2
    assert "none*.jsonl: matches no files" in capsys.readouterr().err


def test_threshold_filter_reuses_keep_exactly():
    docs = [Document(text="x", id=str(i), metadata={"quality": q}) for i, q in enumerate([0.49999, 0.5, 0.73])]
    f = QualityThresholdFilter(threshold=0.5, batch_size=8)
    assert [d.id for d in f.run(iter(docs))] == ["1", "2"]
    with pytest.raises(ValueError, match="no metadata\\['quality'\\]"):
        list(f.run(iter([Document(text="x", id="n")])))


def test_cli_defaults_match_executor_config():
    from minicpm4.data.ultraclean.pipeline_cli import DEFAULTS

    d = ExecutorConfig()
    assert vars(DEFAULTS) == {k: getattr(d, k) for k in vars(DEFAULTS)}


def _fake_slurm(bin_dir: Path, log_dir: Path) -> None:
    """sbatch that keeps the script and runs its array tasks here, one after another; srun/scontrol stand-ins."""
    bin_dir.mkdir()
    log_dir.mkdir()
    scripts = {
        "sbatch": f"""#!{sys.executable}
import os, re, shutil, subprocess, sys
script = sys.argv[-1]
n = len(os.listdir({str(log_dir)!r}))
shutil.copy(script, os.path.join({str(log_dir)!r}, f"{{n}}.slurm"))
text = open(script).read()
lo, hi = map(int, re.search(r"#SBATCH --array=(\\d+)-(\\d+)", text).groups())
env = dict(os.environ, SLURM_JOB_ID=str(100 + n), SLURM_NODELIST="localhost")
for arg in sys.argv[1:-1]:
    if arg.startswith("--export=ALL,"):
        env.update(kv.split("=", 1) for kv in arg[len("--export=ALL,"):].split(","))
for task in range(lo, hi + 1):
    subprocess.run(["bash", script], env=dict(env, SLURM_ARRAY_TASK_ID=str(task)), check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
print(f"Submitted batch job {{100 + n}}")
""",
        "srun": '#!/bin/bash\nwhile [ $# -gt 0 ]; do case "$1" in -n) shift 2;; -*) shift;; *) break;; esac; done\n'
                'exec "$@"\n',
        "scontrol": "#!/bin/sh\necho localhost\n",
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(body)
        path.chmod(path.stat().st_mode | stat.S_IXUSR)


def test_slurm_submission_runs_the_array_with_a_fake_sbatch(setup, tmp_path, monkeypatch):
    _fake_slurm(tmp_path / "bin", tmp_path / "submitted")
    monkeypatch.setenv("PATH", f"{tmp_path / 'bin'}{os.pathsep}{Path(sys.executable).parent}{os.pathsep}"
                       f"{os.environ['PATH']}")
    inputs = tmp_path / "in"
    inputs.mkdir()
    for f in sorted(setup["input"].iterdir())[:2]:
        (inputs / f.name).write_text(f.read_text())
    cfg = PipelineConfig(model=setup["model"], input=str(inputs), out_dir=tmp_path / "kept",
                         tokenizer_dir=setup["tokenizer"])
    ecfg = ExecutorConfig(kind="slurm", tasks=2, logging_dir=tmp_path / "logs", partition="debug", time="01:00:00",
                          cpus_per_task=2, mem_per_cpu_gb=3, sbatch_args=(("account", "proj"),))
    run_pipeline(cfg, ecfg)
    job, merge = sorted((tmp_path / "submitted").iterdir())
    script = job.read_text()
    for line in ("#SBATCH --partition=debug", "#SBATCH --time=01:00:00", "#SBATCH --cpus-per-task=2",
                 "#SBATCH --mem-per-cpu=3G", "#SBATCH --array=0-1", "#SBATCH --account=proj",
                 "#SBATCH --job-name=ultraclean-score", "launch_pickled_pipeline"):
        assert line in script
    assert "merge_stats" in merge.read_text()
    sent = {d["id"] for f in sorted(inputs.iterdir()) for d in map(json.loads, f.read_text().splitlines())}
    assert {r["id"] for r in _records(tmp_path / "kept")} == setup["expected"] & sent
    assert sorted(p.name for p in (ecfg.logging_dir / "score" / "completions").iterdir()) == ["00000", "00001"]
    run_pipeline(cfg, ecfg)  # all tasks complete: nothing is submitted again
    assert len(list((tmp_path / "submitted").iterdir())) == 2


def test_slurm_needs_a_partition_and_ray_needs_ray(tmp_path):
    from minicpm4.data.ultraclean.pipeline import Stage

    stage = Stage("score", [], 1)
    with pytest.raises(UserError, match="--partition"):
        make_executor(stage, ExecutorConfig(kind="slurm", logging_dir=tmp_path))
    try:
        import ray  # noqa: F401
    except ImportError:
        with pytest.raises(UserError, match="pip install ray"):
            make_executor(stage, ExecutorConfig(kind="ray", logging_dir=tmp_path))


def test_ray_executor_runs_the_pipeline(setup, tmp_path):
    ray = pytest.importorskip("ray", reason="the Ray executor needs ray")
    ray.init(num_cpus=2, include_dashboard=False, ignore_reinit_error=True)
    try:
        run_pipeline(_config(setup, tmp_path / "kept"),
                     ExecutorConfig(kind="ray", tasks=4, workers=2, logging_dir=tmp_path / "logs"))
    finally:
        ray.shutdown()
    assert {r["id"] for r in _records(tmp_path / "kept")} == setup["expected"]


def test_help(capsys):
    with pytest.raises(SystemExit) as e:
        main(["data", "ultraclean", "pipeline", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "usage: minicpm4 data ultraclean pipeline" in out and "--partition" in out
