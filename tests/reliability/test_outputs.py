"""A stage's outputs appear whole or not at all, and a killed run's debris is cleared."""

import json
import os
import signal
import subprocess
import sys

from pipelines._stage import Outputs

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_a_run_killed_while_writing_leaves_the_old_output_and_the_next_run_clears_its_debris(
        tmp_path):
    target = tmp_path / "models" / "model"
    target.mkdir(parents=True)
    (target / "model.json").write_text('{"version": "old"}')
    code = ("import sys, time; from pathlib import Path; from pipelines._stage import Outputs\n"
            "out = Outputs(); d = out.path(Path(sys.argv[1]), is_dir=True)\n"
            "(d / 'model.json').write_text('{\"version\": \"half\"}')\n"
            "print('writing', flush=True); time.sleep(60)\n")
    child = subprocess.Popen([sys.executable, "-c", code, str(target)], stdout=subprocess.PIPE,
                             text=True, env=dict(os.environ, PYTHONPATH=ROOT))
    assert child.stdout.readline().strip() == "writing"
    child.send_signal(signal.SIGKILL)
    child.wait(10)
    debris = [p.name for p in target.parent.iterdir() if p.name != "model"]
    assert len(debris) == 1 and debris[0].startswith(".model.staging-")
    assert json.loads((target / "model.json").read_text()) == {"version": "old"}

    out = Outputs()
    staged = out.path(target, is_dir=True)
    (staged / "model.json").write_text('{"version": "new"}')
    out.publish()
    assert sorted(p.name for p in target.parent.iterdir()) == ["model"]
    assert json.loads((target / "model.json").read_text()) == {"version": "new"}


def test_staging_folders_of_other_outputs_are_not_touched(tmp_path):
    (tmp_path / ".model.json.staging-abc").mkdir()  # another output's, in progress
    out = Outputs()
    out.path(tmp_path / "model", is_dir=True)
    assert (tmp_path / ".model.json.staging-abc").exists()
    out.discard()
    assert [p.name for p in tmp_path.iterdir()] == [".model.json.staging-abc"]
