"""The accuracy benchmark end to end at smoke size (JSON, PNG, RESULTS.md section, MLflow sweep), the RESULTS.md
section it rewrites, and every backbone family's demo preset (a few steps here; learning, in the slow tests)."""
from __future__ import annotations

import importlib.util
import json
import re

import pytest

from conftest import REPO, TINY, train_here

_spec = importlib.util.spec_from_file_location("benchmark", REPO / "tools" / "benchmark.py")
_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_benchmark)  # puts the repository on sys.path, for `benchmarks.*`

from benchmarks.accuracy import FAMILIES, SECTION, VARIANTS  # noqa: E402
from benchmarks.machine import replace_section  # noqa: E402

DEMOS = sorted(FAMILIES.values())


def smoke_run(tmp_path, families: list[str]) -> dict:
    """`tools/benchmark.py accuracy --smoke` with its outputs under `tmp_path`; returns its JSON."""
    code = _benchmark.main(["accuracy", "--smoke", "--families", *families, "--out", str(tmp_path / "work"),
                            "--results", str(tmp_path / "results"), "--results-md", str(tmp_path / "RESULTS.md")])
    assert code == 0
    return json.loads((tmp_path / "results" / "accuracy_smoke.json").read_text())


def sweep_children(data: dict) -> tuple:
    """The MLflow client and the child runs of the smoke run's sweep."""
    from mlflow import MlflowClient

    client = MlflowClient(data["tracking_uri"])
    parent = client.get_run(data["mlflow_parent_run"])
    return client, client.search_runs([parent.info.experiment_id],
                                      f"tags.mlflow.parentRunId = '{parent.info.run_id}'", max_results=100)


def test_smoke_run_writes_every_result(tmp_path):
    data = smoke_run(tmp_path, [])
    assert data["kind"] == "smoke" and data["seeds"] == [0] and data["families"] == {}
    assert list(data["heads"]) == [v.key for v in VARIANTS]
    for key, head in data["heads"].items():
        assert 0.0 <= head["accuracy"]["mean"] <= 1.0 and 0.0 <= head["tar_at_far"]["mean"] <= 1.0
        (run,) = head["runs"]
        trained = head["overrides"] is not None
        # A verification before training, then one per probe; the final one is the variant's result.
        assert [p["step"] for p in run["curve"]] == ([0, 4, 8] if trained else [0]), key
        assert run["curve"][-1]["accuracy"] == head["accuracy"]["mean"]
        assert len(run["losses"]) == (2 if trained else 0)
    claims = [c["claim"] for c in data["checks"]]
    assert any("random init" in c for c in claims) and any("compat=reference" in c for c in claims)
    assert all(isinstance(c["passed"], bool) and c["measured"] for c in data["checks"])
    assert (tmp_path / "results" / "accuracy_smoke.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = (tmp_path / "RESULTS.md").read_text()
    assert text.count(SECTION) == 1 and "accuracy_smoke.json" in text and "compat=reference" in text
    _, children = sweep_children(data)
    assert sorted(run.info.run_name for run in children) == sorted(f"{v.key}_seed0" for v in VARIANTS)


@pytest.mark.slow  # an arcface-train process of its own: seconds idle, a minute on a busy machine
def test_smoke_run_with_a_family_adopts_its_training_run(tmp_path):
    data = smoke_run(tmp_path, ["iresnet"])
    family = data["families"]["iresnet"]
    assert "error" not in family, family
    assert [p["step"] for p in family["curve"]] == [0, 1, 2] and family["preset"] == "demo"
    assert any("iresnet" in c["claim"] for c in data["checks"])
    client, children = sweep_children(data)
    (family_run,) = [run for run in children if run.info.run_name.startswith("family_iresnet")]
    assert len(client.get_metric_history(family_run.info.run_id, "synthetic_holdout/acc")) == 3


def test_results_md_keeps_the_other_sections(tmp_path):
    path = tmp_path / "RESULTS.md"
    path.write_text("# Benchmark results\n\n## Speed\n\nfast\n\n## Accuracy\n\nold numbers\n\n## Memory\n\nsmall\n")
    replace_section(path, SECTION, f"{SECTION}\n\nnew numbers\n")
    assert path.read_text() == ("# Benchmark results\n\n## Speed\n\nfast\n\n## Accuracy\n\nnew numbers\n\n"
                                "## Memory\n\nsmall\n")
    fresh = tmp_path / "fresh.md"
    replace_section(fresh, SECTION, f"{SECTION}\n\nfirst\n")
    assert fresh.read_text() == "# Benchmark results\n\n## Accuracy\n\nfirst\n"


def verification(proc) -> tuple[float, float]:
    """(random-init, trained) held-out accuracy from the run's last log line about them."""
    found = re.findall(r"random-init accuracy ([0-9.]+) -> trained accuracy ([0-9.]+)", proc.stdout + proc.stderr)
    assert found, (proc.stdout + proc.stderr)[-3000:]
    return tuple(map(float, found[-1]))


@pytest.mark.parametrize("preset", DEMOS)
def test_demo_preset_trains_a_few_steps(preset, tmp_path):
    tiny = [o for o in TINY if not o.startswith("trainer.verify_at_start=")]
    proc = train_here([f"experiment={preset}", *tiny, "tracking=none"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    verification(proc)


@pytest.mark.slow  # each preset's whole demo: minutes on 2 cores
@pytest.mark.parametrize("preset", DEMOS)
def test_demo_preset_learns(preset, tmp_path):
    proc = train_here([f"experiment={preset}", "tracking=none"], tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    initial, trained = verification(proc)
    assert trained > initial + 0.02, (initial, trained)
