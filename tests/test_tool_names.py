"""The tools that take a run's name refuse one that would leave the runs root."""

from __future__ import annotations

from pathlib import Path

import pytest

from tools.gradcam import main as gradcam
from tools.query import main as query
from tools.roc import main as roc
from tools.show_topk import main as show_topk


@pytest.mark.parametrize("tool, extra", [(query, ["img.png"]), (show_topk, ["--query-index", "0"]),
                                         (roc, []), (gradcam, [])])
@pytest.mark.parametrize("name", ["../outside", "/tmp/outside", "a/../../b"])
def test_a_run_name_leaving_the_runs_root_is_refused(tool, extra, name, tmp_path, capsys):
    runs = tmp_path / "runs"
    (tmp_path / "outside" / "eval").mkdir(parents=True)  # a "run" the name would reach
    runs.mkdir()
    code = tool(["--exp", name, "--runs-root", str(runs), *extra])
    err = capsys.readouterr().err
    assert code == 2
    assert "not an accepted run name" in err and "Traceback" not in err
    assert not list(Path(tmp_path / "outside").rglob("*.png"))
