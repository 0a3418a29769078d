"""Under torchrun (gloo, CPU) both ranks select identical blocks and DDP trains them."""

import json
import os
import subprocess
import sys
from pathlib import Path

TESTS_DIR = Path(__file__).parent


def test_two_ranks_select_identical_blocks_and_train(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
         str(TESTS_DIR / "ddp_worker.py"), str(tmp_path)],
        check=True, env=env, timeout=180,
    )
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["selection"] and ranks[0]["selection"] == ranks[1]["selection"]
    assert ranks[0]["changed"] and ranks[0]["changed"] == ranks[1]["changed"]
    assert ranks[0]["trainable"] == ranks[1]["trainable"]
