"""The DSCA graph's public functions: argument errors, exact kNN without self-loops."""

import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from mftc_peft import graph


def test_graph_argument_errors_and_exact_knn_without_self():
    points = np.random.default_rng(0).normal(size=(20, 3))
    with pytest.raises(ValueError, match="`n_neighbors` must be an integer in 1..19, got 20"):
        graph.knn_graph(points, 20)
    with pytest.raises(ValueError, match="`method` must be one of \\('exact', 'nndescent'\\), got 'kd'"):
        graph.knn_graph(points, 3, method="kd")
    with pytest.raises(ValueError, match="`decay` must lie in \\[0, 1\\), got 1.5"):
        graph.ema_affinity(None, np.zeros((2, 1)), np.zeros((2, 1)), np.zeros((2, 1)), decay=1.5, n_neighbors=1)
    with pytest.raises(ValueError, match="exactly one of `n_neighbors` and `top_p` must be given"):
        graph.ema_affinity(None, np.zeros((2, 1)), np.zeros((2, 1)), np.zeros((2, 1)), decay=0.5)
    with pytest.raises(ValueError, match="`similarity` must be one of"):
        graph.prepare_points(points, "dot")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        indices, distances = graph.knn_graph(points, 3)
    assert indices.shape == (20, 3) and not np.any(indices == np.arange(20)[:, None])


def _threads_before_and_after(script: str) -> list[str]:
    """Run `script` in a fresh process set to 1 thread the way our benchmarks set it (the environment, not
    `torch.set_num_threads`, which hides the change in some processes); its last line prints the counts."""
    env = os.environ | {"OMP_NUM_THREADS": "1", "NUMBA_NUM_THREADS": "2"}
    env.pop("NUMBA_THREADING_LAYER", None)  # the OpenMP layer is the one that touches torch's libgomp
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)
    return done.stdout.strip().splitlines()[-1].split()


def test_nndescent_leaves_torch_thread_count_as_it_was():
    # Numba's OpenMP pool sets libgomp's thread count when it first launches, which is torch's too; a fresh process
    # is the only place where that launch is sure to happen inside the call under test.
    control = (  # the script's imports in its order (which libgomp numba binds to may depend on it), then the launch
        "import numpy as np, torch\n"
        "from mftc_peft import graph\n"
        "import pynndescent, numba\n"
        "before = torch.get_num_threads()\n"
        "numba.get_num_threads()\n"
        "print(before, torch.get_num_threads())\n"
    )
    if _threads_before_and_after(control) == ["1", "1"]:
        pytest.skip("numba's thread pool leaves torch's thread count alone on this machine: nothing to guard")
    script = (
        "import numpy as np, torch\n"
        "from mftc_peft import graph\n"
        "before = torch.get_num_threads()\n"
        "points = np.random.default_rng(0).normal(size=(300, 4))\n"
        "graph.knn_graph(points, 5, method='nndescent', random_state=0)\n"
        "import numba\n"
        "print(before, torch.get_num_threads(), numba.threading_layer())\n"  # raises unless the pool has launched
    )
    assert _threads_before_and_after(script) == ["1", "1", "omp"]
