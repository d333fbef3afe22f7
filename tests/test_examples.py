"""The examples as a new user meets them: ``--help``, the recipe's temperature, nothing left behind."""

from __future__ import annotations

import re
import sys
import tempfile
from pathlib import Path

import pytest

pytest.importorskip("transformers")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
import distill_sparse  # noqa: E402
import distill_tiny  # noqa: E402


@pytest.mark.parametrize("example", [distill_tiny, distill_sparse], ids=["distill_tiny", "distill_sparse"])
def test_help_states_each_default_once_and_the_recipe_temperature(example, capsys):
    with pytest.raises(SystemExit):
        example.parse_args(["--help"])
    options = re.split(r"\n  (?=-)", capsys.readouterr().out)[1:]
    assert options and all(entry.count("default") <= 1 for entry in options), options
    assert example.parse_args([]).temperature == 2.0  # the README's Trainer recipe distils at T = 2


def test_distill_sparse_removes_its_dump(tmp_path, monkeypatch, capsys):
    """Without ``--dump`` the top-k shards go to a temporary directory that is gone at the end."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    distill_sparse.main(["--steps", "2", "--teacher-steps", "2", "--seq-len", "8", "--batch-size", "2"])
    assert "top-16 dump in" in capsys.readouterr().out
    assert list(tmp_path.iterdir()) == []
