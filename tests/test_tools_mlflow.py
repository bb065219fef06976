"""tools/export_onnx.py and tools/eval.py add to an existing MLflow run (the model by mlflow.onnx, the report,
metrics and files) and leave its status as it was; a run id the store lacks is one sentence, said before
anything is evaluated or written."""
from __future__ import annotations

import importlib.util

import torch
from conftest import FIXTURES, REPO

from arcface.engine.training_state import save_backbone
from arcface.models import create_backbone


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_tool", REPO / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_export_and_eval_log_into_a_finished_run(tmp_path, capsys):
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment("arcface")
    run_id = client.create_run(experiment).info.run_id
    client.set_terminated(run_id, "FINISHED")
    torch.manual_seed(0)
    save_backbone(create_backbone("r_tiny", embedding_size=32), tmp_path / "model.pt")
    tracking = ["--run-id", run_id, "--tracking-uri", uri]
    assert _tool("export_onnx").main([str(tmp_path / "model.pt"), "--backbone", "r_tiny", "--embedding-size", "32",
                                      "--output", str(tmp_path / "model.onnx"), "--latency-runs", "1",
                                      *tracking]) == 0
    eval_tool = _tool("eval")
    assert eval_tool.main(["--onnx", str(tmp_path / "model.onnx"), "--bin", str(FIXTURES / "verification" /
                                                                                 "pairs.bin"), "--device", "cpu",
                           *tracking]) == 0
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert {"eval/pairs/acc", "eval/pairs/acc_std", "eval/pairs/xnorm", "eval/pairs/val_at_far"} <= \
        set(run.data.metrics)
    assert [a.path for a in client.list_artifacts(run_id, "evaluation")] == ["evaluation/results.json"]
    assert [a.path for a in client.list_artifacts(run_id, "onnx")] == ["onnx/export_report.json"]
    models = client.search_logged_models(experiment_ids=[experiment])
    assert [m.source_run_id for m in models] == [run_id]
    capsys.readouterr()
    unknown = ["--run-id", "0123456789abcdef", "--tracking-uri", uri]
    assert eval_tool.main(["--onnx", str(tmp_path / "model.onnx"), "--bin", str(FIXTURES / "verification" /
                                                                                 "pairs.bin"), "--device", "cpu",
                           "--output", str(tmp_path / "not_logged"), *unknown]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: MLflow run 0123456789abcdef is not in") and "\n" not in err
    assert _tool("export_onnx").main([str(tmp_path / "model.pt"), "--backbone", "r_tiny", "--embedding-size", "32",
                                      "--output", str(tmp_path / "not_logged.onnx"), *unknown]) == 2
    assert "MLflow run 0123456789abcdef is not in" in capsys.readouterr().err
    # The run is looked up first: neither tool evaluated or exported anything for it.
    assert not (tmp_path / "not_logged").exists() and not (tmp_path / "not_logged.onnx").exists()
