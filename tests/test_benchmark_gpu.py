"""The benchmark entrypoint and its GPU suite: the smoke run fills every section, and the Partial FC step needs
nothing back from the device at a sample rate above zero (checked on the CPU through the ops that would sync)."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from arcface.heads import CombinedMargin, PartialFC
from arcface.heads.sharding import sample_centres

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("benchmark", REPO / "tools" / "benchmark.py")
benchmark = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(benchmark)  # also puts the repository on sys.path, for `benchmarks.*`

from benchmarks.gpu import SECTIONS  # noqa: E402
from benchmarks.host_syncs import HostReads  # noqa: E402

# The GPU machine has none of these unless their wheels travel with the tree: the suite's own process must not need
# them. (Its trainer rows run arcface-train in processes of their own, which need hydra and omegaconf there.)
_BLOCKED = ("hydra", "omegaconf", "mlflow", "simplejpeg")


def test_smoke_run_fills_every_section_without_optional_packages(tmp_path):
    out = tmp_path / "gpu.json"
    code = (f"import sys, runpy; sys.modules.update(dict.fromkeys({_BLOCKED!r})); "
            f"sys.argv = ['tools/benchmark.py', 'gpu', '--smoke', '--out', {str(out)!r}]; "
            f"runpy.run_path('tools/benchmark.py', run_name='__main__')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out.read_text())
    assert data["environment"]["smoke"] is True and data["environment"]["commit"]
    for section in SECTIONS:
        assert data[section], f"section {section} is empty"
        failed = [r for r in data[section] if "error" in r or "skipped" in r]
        assert not failed, failed
    assert any("compiled" in r["name"] and "compile_s" in r for r in data["backbones"])
    assert data["summary"]["baseline"] and data["summary"]["partial_fc_sparse_over_dense"]
    assert "## host_syncs" in out.with_suffix(".md").read_text()


def _host_reads(rate: float) -> list[tuple[str, str]]:
    torch.manual_seed(0)
    head = PartialFC(CombinedMargin(), 16, 1000, rate=rate)
    embeddings = torch.randn(8, 16, requires_grad=True)
    labels = torch.randint(0, 1000, (8,))
    with HostReads() as reads:
        head(embeddings, labels).backward()
    return reads.sites


def test_partial_fc_reads_back_only_what_is_free_on_the_cpu():
    head_sites = [where for where, _ in _host_reads(0.1) if "heads/partial_fc.py" in where or "heads/sharding.py" in where]
    # The label range check runs only for labels on the CPU; the mask sort is the CPU's choice of sort.
    assert head_sites and all("_check_range" in w or "_sorted_by_mask" in w for w in head_sites), head_sites


@pytest.mark.parametrize("positives", [[], [0, 5, 999], list(range(0, 1000, 9))])
def test_fixed_size_sampling_reads_nothing_back_and_matches_the_cpu_path(positives):
    mask = torch.zeros(1000, dtype=torch.bool)
    mask[positives] = True
    cpu = sample_centres(mask, 120, 112, torch.Generator().manual_seed(3))
    with HostReads() as reads:
        fixed = sample_centres(mask, 120, 112, torch.Generator().manual_seed(3), fixed_size=True)
    assert reads.sites == []
    assert torch.equal(fixed, cpu) and len(fixed) == 120 and bool(mask[fixed].sum() == len(positives))


def test_positives_only_sampling_reads_their_count():
    # Rate 0: the sample is the positives, so its size is known only after counting them.
    assert any("sample_centres" in where for where, _ in _host_reads(0.0))


def test_entrypoint_lists_suites_and_refuses_unknown_ones(capsys):
    assert benchmark.main(["--help"]) == 0
    listing = capsys.readouterr().out
    assert all(name in listing for name in ("gpu", "accuracy", "backbones", "data_loader", "partial_fc"))
    assert benchmark.main(["no_such_suite"]) == 2
    assert "unknown suite 'no_such_suite'" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_real_mode_refuses_without_cuda(tmp_path, capsys):
    assert benchmark.main(["gpu", "--out", str(tmp_path / "gpu.json")]) == 2
    assert "--smoke" in capsys.readouterr().err
    assert not (tmp_path / "gpu.json").exists()


def test_gpu_busy_time_counts_overlapping_kernels_once():
    from benchmarks.gpu import busy_us

    assert busy_us([]) == 0
    # Two streams overlapping on [2, 3), one kernel inside another, and a gap of idle time between 5 and 7.
    assert busy_us([(7, 9), (0, 3), (2, 5), (2.5, 2.75)]) == 7


def test_render_recomputes_the_recorded_batch_scaling(tmp_path):
    recorded = tmp_path / "gpu.json"
    recorded.write_text((REPO / "benchmarks" / "results" / "gpu_h200_rerun.json").read_text())
    assert benchmark.main(["gpu", "--render", str(recorded)]) == 0
    scaling = json.loads(recorded.read_text())["summary"]["batch_scaling"]
    # The figures benchmarks/results/gpu_h200_notes.md cites: 8.8 ms + 0.182 ms per sample, 12.6 ms above at 128.
    assert scaling["fitted_batches"] == [512, 1024, 2048]
    assert (scaling["intercept_ms"], scaling["ms_per_sample"], scaling["batch_128_above_line_ms"]) == (8.82, 0.1818, 12.6)
    assert "batch_scaling" in recorded.with_suffix(".md").read_text()
