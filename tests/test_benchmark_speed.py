"""The speed benchmark at smoke size: every section measures both sides of its comparison, each ratio is computed
from the run's own figures, and the JSON, PNG and RESULTS.md section are written (the other sections kept)."""
from __future__ import annotations

import importlib.util
import json

import pytest

from conftest import REPO

_spec = importlib.util.spec_from_file_location("benchmark", REPO / "tools" / "benchmark.py")
_benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_benchmark)  # puts the repository on sys.path, for `benchmarks.*`


def smoke(tmp_path, sections: list[str]) -> dict:
    results_md = tmp_path / "RESULTS.md"
    results_md.write_text("# Benchmark results\n\n## Accuracy\n\nkept\n")
    code = _benchmark.main(["speed", "--smoke", "--sections", *sections, "--results", str(tmp_path),
                            "--results-md", str(results_md)])
    assert code == 0
    assert (tmp_path / "speed.png").stat().st_size > 10_000
    text = results_md.read_text()
    assert text.startswith("# Benchmark results\n\n## Accuracy\n\nkept\n\n## Speed\n")
    assert "python tools/benchmark.py speed --smoke" in text and "cores" in text
    return json.loads((tmp_path / "speed.json").read_text())


def _ratio(claims: list[dict], section: str, starts: str) -> float:
    (claim,) = [c for c in claims if c["section"] == section and c["claim"].startswith(starts)]
    return claim["ratio"]


def test_smoke_run_measures_both_sides_of_each_comparison(tmp_path):
    data = smoke(tmp_path, ["data_loader", "partial_fc", "backbones"])
    loader = {row["name"].split(",")[0]: row for row in data["sections"]["data_loader"]}
    baseline = loader["reference per-image path (PIL + torchvision transforms)"]
    project = loader["project loader + prepare_batch"]
    assert baseline["baseline"] and baseline["images_s"] > 0 and project["images_s"] > 0
    assert _ratio(data["ratios"], "data_loader", "project loader") == project["images_s"] / baseline["images_s"]

    pfc = {row["design"]: row for row in data["sections"]["partial_fc"]}
    assert pfc.keys() == {"dense", "sparse"} and all(row["status"] == "ok" for row in pfc.values())
    assert _ratio(data["ratios"], "partial_fc", "row-sparse / dense step time") == (pfc["sparse"]["step_s"]
                                                                                   / pfc["dense"]["step_s"])
    assert _ratio(data["ratios"], "partial_fc", "row-sparse / dense peak memory") == (pfc["sparse"]["peak_gib"]
                                                                                     / pfc["dense"]["peak_gib"])

    steps = {row["name"]: row["samples_s"] for row in data["sections"]["backbones"]}
    assert set(steps) == {"mbf eager fp32", "mbf eager bf16"} and min(steps.values()) > 0
    assert _ratio(data["ratios"], "backbones", "mbf eager bf16") == steps["mbf eager bf16"] / steps["mbf eager fp32"]


@pytest.mark.slow  # two short training runs in processes of their own
def test_end_to_end_reads_the_rates_the_trainer_logs(tmp_path):
    data = smoke(tmp_path, ["end_to_end"])
    rows = data["sections"]["end_to_end"]
    assert [row["name"] for row in rows] == ["arcface-train experiment=demo, fp32", "arcface-train experiment=demo, bf16"]
    assert all(row["windows"] == 1 and row["samples_s"] > 0 for row in rows)  # steps 9-16 of 16: one window


def test_render_without_a_recorded_run_names_the_file(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        _benchmark.main(["speed", "--render", "--results", str(tmp_path)])
    assert done.value.code == 2
    assert f"{tmp_path / 'speed.json'} does not exist" in capsys.readouterr().err
