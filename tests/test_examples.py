"""The README's NumPy quick start runs and learns."""

import runpy
from pathlib import Path


def test_numpy_quickstart(capsys):
    runpy.run_path(str(Path(__file__).parents[1] / "examples" / "quickstart_numpy.py"))
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert float(last.split()[-1]) > 0.93
