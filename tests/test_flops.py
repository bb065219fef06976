"""tools/flops.py counts MACs with torch and lands within 5% of the reference's published GMACs."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

_spec = importlib.util.spec_from_file_location("flops", Path(__file__).parents[1] / "tools" / "flops.py")
flops = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(flops)


def test_counted_macs_match_published_gmacs(capsys):
    names = sorted(flops.PUBLISHED_GMACS)
    assert flops.main(names) == 0
    table = capsys.readouterr().out.splitlines()
    assert "GMACs" in table[0] and "GFLOPs (2xMACs)" in table[0]
    rows = {cells[0]: cells for cells in ([c.strip() for c in line.strip("|").split("|")] for line in table[2:])}
    assert sorted(rows) == names
    for name, published in flops.PUBLISHED_GMACS.items():
        _, params, gmacs, gflops, shown, _ = rows[name]
        assert float(gmacs) == pytest.approx(published, rel=0.05), name
        assert float(gflops) == pytest.approx(2 * float(gmacs), abs=2e-3)
        assert float(shown) == published


def test_counts_are_not_tabulated():
    # A narrower embedding shrinks only the fc layer (512*7*7 inputs per output): the count follows the model.
    _, wide = flops.backbone_stats("r18", embedding_size=512)
    _, narrow = flops.backbone_stats("r18", embedding_size=128)
    assert wide - narrow == 512 * 7 * 7 * (512 - 128)


def test_help_and_unknown_name(capsys):
    with pytest.raises(SystemExit) as done:
        flops.main(["--help"])
    assert done.value.code == 0 and "GFLOPs = 2 x GMACs" in capsys.readouterr().out
    assert flops.main(["r51"]) == 2
    assert "unknown backbone 'r51'" in capsys.readouterr().err
