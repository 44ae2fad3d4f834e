"""The ``natgrad fisher`` subcommand."""

from __future__ import annotations

import json

import pytest

from natgrad.cli import main


def test_fisher_prints_a_table_and_json(capsys):
    assert main(["fisher", "--samples", "16", "--cg-iterations", "2,40"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    summary = json.loads(out[-1])
    methods = [row["method"] for row in summary["rows"]]
    assert methods[:4] == ["gradient (identity)", "diagonal", "K-FAC", "EKFAC"]
    assert "CG, 40 iterations" in methods
    assert any(line.startswith("K-FAC") for line in out)


@pytest.mark.parametrize("flag", [["--damping", "0"], ["--model", "rnn"],
                                  ["--cg-iterations", "0"], ["--samples", "x"]])
def test_fisher_bad_values_exit_2(flag, capsys):
    with pytest.raises(SystemExit) as err:
        main(["fisher", *flag])
    assert err.value.code == 2
    assert "error:" in capsys.readouterr().err
