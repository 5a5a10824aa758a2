"""The model package stands alone: with `pipeline` unimportable, gsva builds, saves, loads and runs the tiny
model (a user who only wants the model installs nothing of the jobs)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

#: Script prologue that makes `pipeline` unimportable in the process it runs in.
BLOCK_PIPELINE = textwrap.dedent("""
    import sys

    class NoPipeline:
        def find_spec(self, name, path=None, target=None):
            if name == "pipeline" or name.startswith("pipeline."):
                raise ImportError("pipeline is not importable in this test")
            return None

    sys.meta_path.insert(0, NoPipeline())
""")
SCRIPT = BLOCK_PIPELINE + textwrap.dedent("""
    import numpy as np
    import torch

    from gsva import checkpoint, meta
    from gsva.predictor import GSVAPredictor

    torch.manual_seed(0)
    model, tokenizer, model_id = checkpoint.load_model("tiny")
    checkpoint.save_checkpoint(model, tokenizer, sys.argv[1])
    assert meta.load_config(sys.argv[1]).name == "tiny"
    predictor = GSVAPredictor.from_checkpoint(sys.argv[1])
    image = np.full((40, 48, 3), 128, dtype=np.uint8)
    out = predictor.predict([image], [["the red circle", "all squares"]], mode="teacher-forced",
                            no_target=[[False, True]])
    assert len(out[0]) == 2 and out[0][0].mask.shape == (40, 48), out
    assert not any(m.startswith("pipeline") for m in sys.modules)
    print("standalone ok", predictor.model_id)
""")


def test_gsva_runs_without_pipeline(tmp_path):
    result = subprocess.run([sys.executable, "-c", SCRIPT, str(tmp_path / "ckpt")], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "standalone ok tiny@sha256:" in result.stdout
