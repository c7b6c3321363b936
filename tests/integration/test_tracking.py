"""Experiment tracking against real services: an `mlflow server` (sqlite backend) and W&B offline.

A small deterministic fake training loop logs the pretraining metrics (loss, prob_perplexity,
code_perplexity, temp) per update plus validation metrics; the histories read back from MLflow
(MlflowClient) and from the offline `.wandb` file must equal metrics.jsonl step for step. Also:
a process SIGKILLed mid-run and restarted continues the same MLflow and W&B runs, and an MLflow
outage is survived and repaired by `sync-runs` (idempotently).
"""

from __future__ import annotations

import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from repro.config import ReproConfig
from repro.track import build_tracker
from repro.track.base import FanOutTracker, metric_key
from repro.track.jsonl import JsonlTracker, iter_metric_records, logged_names_by_step

IN_CI = os.environ.get("CI", "").lower() == "true"
REPO = Path(__file__).resolve().parents[2]
TRAIN_KEYS = ("loss", "prob_perplexity", "code_perplexity", "temp")


# ---- helpers ---------------------------------------------------------------------------------
def fake_update_metrics(step: int) -> dict[str, float]:
    """Deterministic stand-ins for one update's logged values (shapes like a real pretraining run)."""
    return {
        "loss": 4.6 / (1.0 + 0.05 * step) + 0.01 * math.sin(step),
        "prob_perplexity": 20.0 + 3.0 * step,
        "code_perplexity": 18.0 + 2.5 * step,
        "temp": max(2.0 * 0.999995**step, 0.5),
    }


def fake_training(tracker, first: int, last: int, valid_every: int = 10, delay_s: float = 0.0) -> None:
    for step in range(first, last + 1):
        tracker.log_metrics(fake_update_metrics(step), step=step)
        if step % valid_every == 0:
            tracker.log_metrics({"loss": 3.0 / step, "wer": 1.0 / step}, step=step, split="valid")
        if delay_s:
            time.sleep(delay_s)


def make_cfg(tmp_path: Path, backends: list[str], tracking_uri: str | None = None, experiment: str = "t1_row"):
    cfg = OmegaConf.structured(ReproConfig)
    cfg.experiment = experiment
    cfg.stage = "pretrain"
    cfg.task.data = str(tmp_path / "data")
    cfg.paper.table = "table1_tracking_test"
    cfg.paper.rows = ["t1_base_10m_viterbi", "t1_base_10m_kenlm"]
    cfg.tracker.backends = backends
    cfg.tracker.mlflow.tracking_uri = tracking_uri
    return cfg


def jsonl_history(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metric key -> [(step, value)] from metrics.jsonl, in file order."""
    out: dict[str, list[tuple[int, float]]] = {}
    for record in iter_metric_records(run_dir / "metrics.jsonl"):
        for name, value in record.items():
            if name not in ("step", "split", "time"):
                out.setdefault(metric_key(name, record["split"]), []).append((record["step"], value))
    return out


def mlflow_history(client, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def wait_for(condition, timeout_s: float, what: str, interval_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval_s)
    raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")


class MlflowServer:
    """A real `mlflow server` (sqlite backend) in its own process group; restartable on the same db/port."""

    def __init__(self, root: Path):
        self.root = root
        self.db = root / "mlflow.db"
        self.artifacts = root / "artifacts"
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen | None = None
        self.binary = Path(sys.executable).parent / "mlflow"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def start(self, timeout_s: float = 120.0) -> None:
        log = (self.root / "server.log").open("a")
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        self.process = subprocess.Popen(
            [str(self.binary), "server", "--workers", "1",
             "--backend-store-uri", f"sqlite:///{self.db}", "--default-artifact-root", str(self.artifacts),
             "--host", "127.0.0.1", "--port", str(self.port)],
            stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True,
        )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.healthy():
                return
            if self.process.poll() is not None:
                break
            time.sleep(0.25)
        tail = (self.root / "server.log").read_text()[-2000:]
        self.stop()
        raise RuntimeError(f"mlflow server did not become healthy on {self.url}; log tail:\n{tail}")

    def stop(self) -> None:
        if self.process is None:
            return
        try:
            os.killpg(self.process.pid, signal.SIGTERM)  # start_new_session: pid == pgid
            self.process.wait(timeout=15)
        except ProcessLookupError:
            pass
        except subprocess.TimeoutExpired:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=15)
        self.process = None
        wait_for(lambda: not self.healthy(), 15, "the server to go down")


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    server = MlflowServer(tmp_path_factory.mktemp("mlflow_server"))
    if not server.binary.exists():
        if IN_CI:
            pytest.fail(f"CI=true but the mlflow binary is missing ({server.binary})", pytrace=False)
        pytest.skip(f"no mlflow binary at {server.binary}")
    try:
        server.start()
    except RuntimeError as error:
        if IN_CI:
            pytest.fail(f"CI=true but {error}", pytrace=False)
        pytest.skip(str(error))
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def quick_mlflow_client(monkeypatch):
    """The tracker retries on its own with backoff; the client's long internal retry chain would only
    slow the outage test down. W&B runs offline without any account."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_DIR", raising=False)
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


# ---- no service needed ---------------------------------------------------------------------------
def test_jsonl_records_and_replay_dedup(tmp_path):
    """A restart that replays already-logged updates logs each (split, step, name) once, and a line
    half-written by a killed process neither breaks reading nor glues onto the next record."""
    run_dir = tmp_path / "runs" / "row"
    first = FanOutTracker([JsonlTracker(run_dir)])
    fake_training(first, 1, 12)
    with (run_dir / "metrics.jsonl").open("a") as handle:
        handle.write('{"step": 13, "split": "train", "lo')  # killed mid-write
    second = FanOutTracker([JsonlTracker(run_dir)], already_logged=logged_names_by_step(run_dir / "metrics.jsonl"))
    fake_training(second, 6, 20)  # resumed from the checkpoint of update 5
    second.finish()

    history = jsonl_history(run_dir)
    assert [step for step, _ in history["loss"]] == list(range(1, 21))
    assert [step for step, _ in history["valid/wer"]] == [10, 20]
    assert history["temp"] == [(s, fake_update_metrics(s)["temp"]) for s in range(1, 21)]
    assert json.loads((run_dir / "tracker_status.json").read_text())["status"] == "FINISHED"


def test_failing_backend_never_stops_training(tmp_path, caplog):
    class Broken:
        def __getattr__(self, name):
            def fail(*args, **kwargs):
                raise ConnectionError("store is down")
            return fail

    tracker = FanOutTracker([Broken(), JsonlTracker(tmp_path / "run")])
    with caplog.at_level(logging.WARNING, logger="repro.track"):
        fake_training(tracker, 1, 5)
        tracker.finish()
    assert len(jsonl_history(tmp_path / "run")["loss"]) == 5
    warnings = [r for r in caplog.records if "log_metrics failed" in r.getMessage()]
    assert len(warnings) == 1  # warned once, not once per update


# ---- MLflow server ---------------------------------------------------------------------------------
@pytest.mark.mlflow_server
def test_mlflow_server_history_equals_jsonl(mlflow_server, tmp_path):
    from mlflow import MlflowClient

    run_dir = tmp_path / "runs" / "t1_row"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text("experiment: t1_row\n")
    tracker = build_tracker(make_cfg(tmp_path, ["mlflow"], mlflow_server.url), run_dir)
    fake_training(tracker, 1, 40)
    tracker.finish()

    run_id = json.loads((run_dir / "tracker_runs.json").read_text())["mlflow"]["run_id"]
    assert tracker.run_ids() == {"mlflow": run_id}
    client = MlflowClient(tracking_uri=mlflow_server.url)
    expected = jsonl_history(run_dir)
    for key in (*TRAIN_KEYS, "valid/loss", "valid/wer"):
        assert mlflow_history(client, run_id, key) == expected[key], key
    assert [s for s, _ in expected["loss"]] == list(range(1, 41))
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "t1_row"
    assert client.get_experiment(run.info.experiment_id).name == "table1_tracking_test"
    assert run.data.tags["repro.rows"] == "t1_base_10m_viterbi,t1_base_10m_kenlm"
    assert run.data.tags["repro.stage"] == "pretrain"
    assert run.data.params["optimization.lr"] == "[0.0005]"
    assert run.data.params["model.latent_vars"] == "320"
    assert [a.path for a in client.list_artifacts(run_id)] == ["config.yaml"]



@pytest.mark.mlflow_server
def test_sweep_jobs_share_a_parent_run(mlflow_server, tmp_path):
    """Jobs of one Hydra multirun sweep become child runs of one parent run (mlflow.parentRunId)."""
    from mlflow import MlflowClient

    from repro.track.context import build_context
    from repro.track.mlflow import MlflowTracker

    sweep_dir = tmp_path / "runs" / "multirun" / "t1_row"
    run_ids = []
    for job in ("lr=1", "lr=2"):
        context = build_context(make_cfg(tmp_path, ["mlflow"]), sweep_dir / job)
        context.sweep_dir = str(sweep_dir)
        tracker = MlflowTracker(context, OmegaConf.create({"tracking_uri": mlflow_server.url}))
        tracker.finish()
        run_ids.append(tracker.run_ids()["mlflow"])
    client = MlflowClient(tracking_uri=mlflow_server.url)
    parents = {client.get_run(run_id).data.tags["mlflow.parentRunId"] for run_id in run_ids}
    (parent,) = parents
    assert parent not in run_ids and client.get_run(parent).info.run_name == "t1_row (sweep)"


CHILD = """
import sys, time
from pathlib import Path
sys.path.insert(0, {repo!r})
sys.path.insert(0, {tests!r})
from test_tracking import fake_training, make_cfg
from repro.track import build_tracker
tmp = Path({tmp!r})
tracker = build_tracker(make_cfg(tmp, ["mlflow", "wandb"], {url!r}), tmp / "runs" / "t1_row")
fake_training(tracker, 1, 12)
print("LOGGED", flush=True)
time.sleep(600)  # still "training" when the SIGKILL comes
"""


@pytest.mark.mlflow_server
def test_resume_after_sigkill_continues_same_runs(mlflow_server, tmp_path):
    from mlflow import MlflowClient

    from repro.track.wandb import read_offline_history

    run_dir = tmp_path / "runs" / "t1_row"
    script = CHILD.format(repo=str(REPO), tests=str(Path(__file__).parent), tmp=str(tmp_path), url=mlflow_server.url)
    env = {**os.environ, "WANDB_SILENT": "true"}
    child = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, env=env,
                             start_new_session=True, text=True)
    client = MlflowClient(tracking_uri=mlflow_server.url)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "LOGGED"
        run_id = wait_for(
            lambda: json.loads((run_dir / "tracker_runs.json").read_text()).get("mlflow", {}).get("run_id"),
            30, "the MLflow run id",
        )
        wait_for(lambda: len(client.get_metric_history(run_id, "loss")) == 12, 30, "12 updates in MLflow")
        wandb_id = json.loads((run_dir / "tracker_runs.json").read_text())["wandb"]["run_id"]
        # W&B holds the newest row until the next step; its file is flushed every 2 s.
        wait_for(lambda: len(read_offline_history(run_dir, wandb_id)) == 11, 30, "11 updates in the .wandb file")
    finally:
        os.killpg(child.pid, signal.SIGKILL)  # the whole job dies, as on a node failure
        child.wait(timeout=30)
    assert client.get_run(run_id).info.status == "RUNNING"

    # The requeued job resumes from its checkpoint of update 5 and replays updates 6..12.
    tracker = build_tracker(make_cfg(tmp_path, ["mlflow", "wandb"], mlflow_server.url), run_dir)
    assert tracker.run_ids() == {"mlflow": run_id, "wandb": wandb_id}
    fake_training(tracker, 6, 30)
    tracker.finish()

    expected = jsonl_history(run_dir)
    assert [s for s, _ in expected["loss"]] == list(range(1, 31))  # replayed updates not logged twice
    for key in TRAIN_KEYS:
        assert mlflow_history(client, run_id, key) == expected[key], key
    assert client.get_run(run_id).info.status == "FINISHED"
    same_dir = [r for r in client.search_runs([client.get_run(run_id).info.experiment_id])
                if r.data.tags.get("repro.run_dir") == str(run_dir.resolve())]
    assert [r.info.run_id for r in same_dir] == [run_id]  # no second run was opened

    rows = read_offline_history(run_dir, wandb_id)
    steps = [row["_step"] for row in rows]
    assert steps == sorted(set(steps)), "W&B steps must stay monotonic across the restart"
    assert set(range(13, 31)) <= set(steps)  # the resumed process's updates, in the same W&B run
    assert set(range(1, 12)) <= set(steps)  # the killed process's updates (the newest dies with it)
    values = dict(expected["loss"])
    assert all(row["loss"] == values[row["_step"]] for row in rows)


@pytest.mark.mlflow_server
def test_outage_then_sync_runs_fills_gap_idempotently(mlflow_server, tmp_path, monkeypatch, caplog):
    from mlflow import MlflowClient

    from repro.tools.__main__ import main as tools_main
    from repro.track.mlflow import MlflowTracker

    monkeypatch.setattr(MlflowTracker, "flush_timeout_s", 1.0)
    run_dir = tmp_path / "runs" / "t1_row"
    client = MlflowClient(tracking_uri=mlflow_server.url)
    tracker = build_tracker(make_cfg(tmp_path, ["mlflow"], mlflow_server.url), run_dir)
    run_id = tracker.run_ids()["mlflow"]
    fake_training(tracker, 1, 10)
    wait_for(lambda: len(client.get_metric_history(run_id, "loss")) == 10, 30, "10 updates in MLflow")

    mlflow_server.stop()
    with caplog.at_level(logging.WARNING, logger="repro.track"):
        started = time.monotonic()
        fake_training(tracker, 11, 30)  # MLflow is down: nothing may raise or wait on it
        elapsed = time.monotonic() - started
        mlflow_backend = tracker.backends[1]
        wait_for(lambda: mlflow_backend._failing, 30, "the tracker to notice the outage")
        time.sleep(1.5)  # a few backoff retries
        tracker.finish()
    assert elapsed < 2.0
    down_warnings = [r for r in caplog.records if "failed:" in r.getMessage() and "MLflow" in r.getMessage()]
    assert len(down_warnings) == 1
    assert any("sync-runs" in r.getMessage() for r in caplog.records)
    assert [s for s, _ in jsonl_history(run_dir)["loss"]] == list(range(1, 31))

    mlflow_server.start()
    assert [s for s, _ in mlflow_history(client, run_id, "loss")] == list(range(1, 11))
    sync = subprocess.run([sys.executable, "-m", "repro.tools", "sync-runs", str(run_dir)], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert sync.returncode == 0, sync.stderr
    assert f"MLflow run {run_id}" in sync.stdout
    expected = jsonl_history(run_dir)
    for key in (*TRAIN_KEYS, "valid/loss", "valid/wer"):
        assert mlflow_history(client, run_id, key) == expected[key], key
    assert client.get_run(run_id).info.status == "FINISHED"

    lengths = {key: len(client.get_metric_history(run_id, key)) for key in expected}
    assert tools_main(["sync-runs", str(run_dir)]) == 0  # second time: nothing to do
    assert {key: len(client.get_metric_history(run_id, key)) for key in expected} == lengths
    assert sum(lengths.values()) == sum(len(v) for v in expected.values())


@pytest.mark.mlflow_server
def test_runs_table_from_mlflow_and_jsonl(mlflow_server, tmp_path, capsys):
    from repro.tools.__main__ import main as tools_main

    run_dir = tmp_path / "runs" / "t1_table_row"
    tracker = build_tracker(make_cfg(tmp_path, ["mlflow"], mlflow_server.url, experiment="t1_table_row"), run_dir)
    fake_training(tracker, 1, 20)
    tracker.finish()
    last = fake_update_metrics(20)
    capsys.readouterr()  # MLflow's own "View run" lines

    assert tools_main(["runs", "--tracking-uri", mlflow_server.url, "--metrics", "loss,temp,valid/wer"]) == 0
    from_mlflow = capsys.readouterr().out.splitlines()
    assert from_mlflow[0].split()[:7] == ["row", "stage", "status", "last", "update", "step", "loss"]
    line = next(line for line in from_mlflow if line.startswith("t1_table_row "))
    assert line.split()[1:3] == ["pretrain", "FINISHED"]
    assert f"{last['loss']:.4g}" in line.split() and "20" in line.split() and "0.05" in line.split()

    assert tools_main(["runs", "--runs", str(tmp_path / "runs"), "--metrics", "loss,temp,valid/wer"]) == 0
    from_jsonl = capsys.readouterr().out.splitlines()
    line = next(line for line in from_jsonl if line.startswith("t1_table_row "))
    assert line.split()[1:3] == ["pretrain", "FINISHED"]
    assert f"{last['loss']:.4g}" in line.split() and "20" in line.split() and "0.05" in line.split()


# ---- W&B offline -------------------------------------------------------------------------------------
def test_wandb_offline_history_equals_jsonl(tmp_path):
    from repro.track.wandb import read_offline_history

    run_dir = tmp_path / "runs" / "t1_row"
    tracker = build_tracker(make_cfg(tmp_path, ["wandb"]), run_dir)
    fake_training(tracker, 1, 25)
    tracker.finish()

    wandb_id = tracker.run_ids()["wandb"]
    rows = read_offline_history(run_dir, wandb_id)
    logged = {row["_step"]: {k: v for k, v in row.items() if not k.startswith("_")} for row in rows}
    expected: dict[int, dict[str, float]] = {}
    for key, points in jsonl_history(run_dir).items():
        for step, value in points:
            expected.setdefault(step, {})[key] = value
    assert logged == expected
    assert set(expected[20]) == {*TRAIN_KEYS, "valid/loss", "valid/wer"}


# ---- embedded store (nothing started) -------------------------------------------------------------------
@pytest.mark.filterwarnings("ignore::DeprecationWarning:mlflow.*")
def test_sync_runs_creates_run_in_embedded_store(tmp_path):
    """A run that had no MLflow (tracker=none) is replayed into the default sqlite store beside the runs."""
    from mlflow import MlflowClient

    from repro.track.mlflow import sync_run_dir

    run_dir = tmp_path / "runs" / "t1_row"
    tracker = build_tracker(make_cfg(tmp_path, []), run_dir)
    fake_training(tracker, 1, 15)
    tracker.finish()

    result = sync_run_dir(run_dir)
    assert result["tracking_uri"] == f"sqlite:///{(tmp_path / 'runs' / 'mlflow.db').resolve()}"
    assert result["logged_metrics"] == sum(len(v) for v in jsonl_history(run_dir).values())
    client = MlflowClient(tracking_uri=result["tracking_uri"])
    run = client.get_run(result["run_id"])
    assert run.info.status == "FINISHED" and run.info.run_name == "t1_row"
    assert run.info.artifact_uri.startswith((tmp_path / "runs" / "mlartifacts").resolve().as_uri())
    assert mlflow_history(client, result["run_id"], "code_perplexity") == jsonl_history(run_dir)["code_perplexity"]
    assert sync_run_dir(run_dir)["logged_metrics"] == 0


@pytest.mark.filterwarnings("ignore::DeprecationWarning:mlflow.*")
def test_first_start_of_embedded_store_is_announced_not_an_outage(tmp_path, monkeypatch, caplog):
    """Creating the sqlite store's tables takes seconds: said and timed, never "did not answer"."""
    from repro.track.context import build_context
    from repro.track.mlflow import MlflowTracker

    monkeypatch.setattr(MlflowTracker, "start_timeout_s", 0.0)  # any wait for a store that exists times out
    store = (tmp_path / "runs" / "mlflow.db").resolve()
    for name in ("t1_row", "t1_other"):
        (tmp_path / "runs" / name).mkdir(parents=True)
    with caplog.at_level(logging.INFO, logger="repro.track"):
        first = MlflowTracker(build_context(make_cfg(tmp_path, ["mlflow"]), tmp_path / "runs" / "t1_row"))
    first.finish()
    messages = [record.getMessage() for record in caplog.records]
    assert f"MLflow: creating the embedded store {store} (first start only: MLflow sets up its tables)" in messages
    assert any(message.startswith("MLflow: embedded store ready in ") for message in messages), messages
    assert not [record for record in caplog.records if record.levelno >= logging.WARNING], messages
    assert first.run_ids()["mlflow"]

    caplog.clear()  # the store exists now: a slow open is named as such, still not as an outage
    with caplog.at_level(logging.INFO, logger="repro.track"):
        second = MlflowTracker(build_context(make_cfg(tmp_path, ["mlflow"]), tmp_path / "runs" / "t1_other"))
    second.finish()
    messages = [record.getMessage() for record in caplog.records]
    assert not any("creating" in message or "did not answer" in message for message in messages), messages


# ---- the real trainer -----------------------------------------------------------------------------
@pytest.mark.mlflow_server
def test_tiny_pretraining_against_server(mlflow_server, tmp_path):
    """A real (tiny, CPU) wav2vec 2.0 pretraining run logs every update to the server."""
    from mlflow import MlflowClient

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from train_fixtures import make_corpus, pretrain_config

    from repro.train.stages import run_pretrain

    cfg = pretrain_config(make_corpus(tmp_path / "data", train=12, valid=4))
    cfg.experiment, cfg.paper.table, cfg.stage = "tiny_pretrain", "table1_tracking_test", "pretrain"
    cfg.tracker.backends = ["mlflow"]
    cfg.tracker.mlflow.tracking_uri = mlflow_server.url
    run_dir = tmp_path / "runs" / "tiny_pretrain"
    tracker = build_tracker(cfg, run_dir)
    try:
        run_pretrain(cfg, run_dir, tracker)
    finally:
        tracker.finish()

    expected = jsonl_history(run_dir)
    assert [s for s, _ in expected["loss"]] == list(range(1, cfg.optimization.max_update + 1))
    client = MlflowClient(tracking_uri=mlflow_server.url)
    run_id = tracker.run_ids()["mlflow"]
    for key in (*TRAIN_KEYS, "valid/loss"):
        assert mlflow_history(client, run_id, key) == expected[key], key
    assert all(0.5 <= value <= 2.0 for _, value in expected["temp"])  # Gumbel temperature schedule
    assert client.get_run(run_id).info.status == "FINISHED"
