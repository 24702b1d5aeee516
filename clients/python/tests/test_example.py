"""The README's example script runs against the demo server and writes its plot."""

import os
import pathlib
import subprocess
import sys

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "delay_plot.py"


def test_the_delay_plot_example_writes_delay_png(demo_server, tmp_path):
    env = dict(os.environ, ERN_API_KEY=demo_server.keys["dr-visser"])
    done = subprocess.run(
        [sys.executable, str(EXAMPLE), demo_server.address],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "onset_age_band" in done.stdout
    assert "k=5" in done.stdout
    assert (tmp_path / "delay.png").stat().st_size > 10_000


def test_the_readme_shows_the_example_as_it_is():
    readme = (EXAMPLE.parents[3] / "README.md").read_text()
    marker = "# clients/python/examples/delay_plot.py\n"
    shown = readme.split(marker, 1)[1].split("```", 1)[0]
    script = EXAMPLE.read_text().split('"""', 2)[2]
    assert shown.strip() == script.strip()
