"""``python -m skdict`` (the README's demo) on a small problem."""

import re

import pytest

from skdict.__main__ import main


def test_demo_runs_and_reports_steady_state_and_first_call(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    out = tmp_path / "atoms.png"
    assert main(["--n-patches", "800", "--n-components", "32", "--epochs", "1",
                 "--device", "cpu", "--out", str(out)]) == 0
    text = capsys.readouterr().out
    m = re.search(r"held-out exact lasso codes \((\d+) rows, ([\d.]+) s; "
                  r"first call ([\d.]+) s", text)
    assert m and int(m.group(1)) == 80
    assert "mean L0 = " in text and out.stat().st_size > 0
    # one epoch: one mean objective (a positive lasso objective)
    m = re.search(r"epoch objective: ([\d.]+)\n", text)
    assert m and float(m.group(1)) > 0
