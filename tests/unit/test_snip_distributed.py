"""Data-parallel SNIP scoring: two gloo processes under torchrun give the single-process scores."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

from conftest import make_tiny_model

from mechsafe.snip import ScoreConfig, ScoreStore, compute_scores

TESTS = Path(__file__).resolve().parent.parent
EXAMPLES = [(f"question number {i}", f"answer {i} " + "word " * (i % 4)) for i in range(7)]

SCRIPT = textwrap.dedent(f"""
    import sys
    sys.path.insert(0, {str(TESTS)!r})
    import torch
    from conftest import make_tiny_model
    from mechsafe import distributed
    from mechsafe.snip import ScoreConfig, compute_scores

    assert distributed.init_from_env("cpu") and distributed.world_size() == 2
    torch.set_num_threads(1)
    store = compute_scores(make_tiny_model(), {EXAMPLES!r}, ScoreConfig(data="x.jsonl", batch_size=2),
                           root=sys.argv[1], progress=False)
    print("rank", distributed.rank(), "store", store.path.name)
    distributed.shutdown()
""")


def test_two_gloo_processes_give_the_single_process_scores(tmp_path):
    single = compute_scores(make_tiny_model(), EXAMPLES, ScoreConfig(data="x.jsonl", batch_size=2),
                            root=tmp_path / "single", progress=False)
    script = tmp_path / "score.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(script), str(tmp_path / "ddp")], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    parallel = ScoreStore.open(tmp_path / "ddp" / single.path.name)  # the same key: same model, data and settings
    assert parallel.manifest["world_size"] == 2 and single.manifest["world_size"] == 1
    for layer in single.layers:
        for kind, want in single.layer(layer).items():
            got = parallel.layer(layer)[kind]
            assert ((got - want).abs().max() / want.abs().max()) < 1e-5, (layer, kind)
