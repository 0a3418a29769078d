"""DSCA scaling on planted groups: seconds per update (cold / warm), JIT, peak memory, ARI; scikit-learn as reference.

Every (method, size) runs in its own subprocess, so peak resident memory (ru_maxrss) is that run's own and a
scikit-learn run that does not finish can be stopped at a time limit. Results: JSON lines plus a Markdown table
generated from them.

    python benchmarks/dsca_scaling.py --quick     # 1e3 and 1e4 nodes, a few minutes
    python benchmarks/dsca_scaling.py             # 1e3 ... 1e6 nodes (full profile)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

RESULTS = Path(__file__).resolve().parent / "results"
N_CLUSTERS, N_FEATURES, NOISE = 12, 16, 0.8


def planted(m, seed):
    """Planted labels and a draw() of signatures: one random centre per group plus fresh noise at every update."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(N_CLUSTERS, size=m)
    centres = rng.normal(size=(N_CLUSTERS, N_FEATURES))
    return labels, lambda: centres[labels] + NOISE * rng.normal(size=(m, N_FEATURES))


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def run_dsca(m, n_updates, seed):
    from sklearn.metrics import adjusted_rand_score

    from mftc_peft.dsca import DynamicSpectralClustering

    labels, draw = planted(m, seed)
    est = DynamicSpectralClustering(n_clusters=N_CLUSTERS, random_state=seed)
    jit = None
    if m > est.exact_threshold:  # pay pynndescent's compilation on a toy graph first, and time it on its own
        from pynndescent import NNDescent

        start = time.perf_counter()
        NNDescent(np.random.default_rng(0).normal(size=(500, N_FEATURES)).astype(np.float32), n_neighbors=10)
        jit = time.perf_counter() - start
    seconds, aris = [], []
    for _ in range(n_updates):
        signatures = draw()
        start = time.perf_counter()
        est.update(signatures)
        seconds.append(time.perf_counter() - start)
        aris.append(float(adjusted_rand_score(labels, est.labels_)))
    warm = [s for s, h in zip(seconds, est.history_) if not h["reset"] and h["warm_start"]]
    return {
        "method": "dsca",
        "knn": "exact" if m <= est.exact_threshold else "nndescent",
        "n_neighbors": est.n_neighbors_,
        "jit_s": jit,
        "cold_s": seconds[0],
        "warm_s": float(np.median(warm)) if warm else None,
        "update_s": seconds,
        "lobpcg_iters": [h["n_iter"] for h in est.history_],
        "ari": float(adjusted_rand_score(labels, est.labels_)),
        "ari_per_update": aris,
        "nnz": int(est.affinity_.nnz),
    }


def run_sklearn(m, seed):
    from sklearn.cluster import SpectralClustering
    from sklearn.metrics import adjusted_rand_score

    from mftc_peft.graph import default_n_neighbors, prepare_points

    labels, draw = planted(m, seed)
    points = prepare_points(draw(), "cosine")  # unit rows: Euclidean kNN = cosine kNN, the graph DSCA builds
    k = default_n_neighbors(m)
    model = SpectralClustering(
        n_clusters=N_CLUSTERS, affinity="nearest_neighbors", n_neighbors=k, random_state=seed, n_init=3
    )
    start = time.perf_counter()
    predicted = model.fit_predict(points)
    return {
        "method": "sklearn",
        "knn": "exact",
        "n_neighbors": k,
        "fit_s": time.perf_counter() - start,
        "ari": float(adjusted_rand_score(labels, predicted)),
    }


def worker(args):
    import sklearn.cluster  # noqa: F401  load the OpenMP runtime first: threadpoolctl limits only loaded libraries
    from threadpoolctl import threadpool_limits

    import mftc_peft.dsca  # noqa: F401

    with threadpool_limits(args.blas_threads):
        load = os.getloadavg()[0]
        row = run_dsca(args.size, args.updates, args.seed) if args.worker == "dsca" else run_sklearn(args.size, args.seed)
    row.update(n_nodes=args.size, n_features=N_FEATURES, n_clusters=N_CLUSTERS, status="ok", seed=args.seed,
               peak_rss_mb=peak_rss_mb(), blas_threads=args.blas_threads, loadavg_1min_at_start=load)
    print(json.dumps(row), flush=True)


def launch(method, size, args, timeout):
    command = [sys.executable, __file__, "--worker", method, "--size", str(size), "--updates", str(args.updates),
               "--seed", str(args.seed), "--blas-threads", str(args.blas_threads)]
    env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    start = time.perf_counter()
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return {"method": method, "n_nodes": size, "status": f"timeout after {timeout} s"}
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        tail = done.stderr.strip().splitlines()[-1:] or ["no output"]
        return {"method": method, "n_nodes": size, "status": f"error: {tail[0]}"}
    row = json.loads(lines[-1])
    row["process_s"] = time.perf_counter() - start
    return row


def loglog_slope(rows):
    points = [(r["n_nodes"], r["warm_s"]) for r in rows if r.get("warm_s")]
    if len(points) < 2:
        return None
    x, y = np.log10([p[0] for p in points]), np.log10([p[1] for p in points])
    return float(np.polyfit(x, y, 1)[0])


def fmt(value, digits=2):
    return "—" if value is None else f"{value:.{digits}f}"


def markdown(rows, meta):
    dsca = {r["n_nodes"]: r for r in rows if r["method"] == "dsca"}
    ref = {r["n_nodes"]: r for r in rows if r["method"] == "sklearn"}
    lines = [
        "# DSCA scaling (generated by benchmarks/dsca_scaling.py; do not edit by hand)",
        "",
        f"Planted groups: k={N_CLUSTERS}, d={N_FEATURES}, noise {NOISE}; {meta['updates']} updates per size "
        f"(update 1 cold, then warm); BLAS/OpenMP threads {meta['blas_threads']}; {meta['machine']}. "
        "scikit-learn: `SpectralClustering(affinity='nearest_neighbors', n_neighbors=k)` on the same unit-normalised "
        "signatures (one fit). Speed-up = scikit-learn fit / DSCA warm update. Peak RSS includes the interpreter "
        "and imports (~200-300 MB).",
        "",
        "| nodes | kNN | k | JIT s | DSCA cold s | DSCA warm s | DSCA ARI | DSCA peak MB | sklearn s | sklearn ARI "
        "| sklearn peak MB | speed-up | ARI diff | load |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m in sorted(set(dsca) | set(ref)):
        d, s = dsca.get(m, {}), ref.get(m, {})
        ok_d, ok_s = d.get("status") == "ok", s.get("status") == "ok"
        speedup = s["fit_s"] / d["warm_s"] if ok_d and ok_s and d.get("warm_s") else None
        diff = d["ari"] - s["ari"] if ok_d and ok_s else None
        lines.append(
            f"| {m:,} | {d.get('knn', '—')} | {d.get('n_neighbors', '—')} | {fmt(d.get('jit_s'), 1)} "
            f"| {fmt(d.get('cold_s'))} | {fmt(d.get('warm_s'))} | {fmt(d.get('ari'), 4)} | {fmt(d.get('peak_rss_mb'), 0)} "
            f"| {fmt(s.get('fit_s')) if ok_s else s.get('status', 'not run')} | {fmt(s.get('ari'), 4)} "
            f"| {fmt(s.get('peak_rss_mb'), 0)} | {fmt(speedup, 1)} | {fmt(diff, 4)} | {fmt(d.get('loadavg_1min_at_start'), 1)} |"
        )
    slope = loglog_slope([r for r in dsca.values() if r.get("status") == "ok"])
    lines += ["", f"Log-log slope of DSCA warm seconds per update vs nodes: {fmt(slope)} (m log m over this range ~ 1.1)."]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="sizes 1e3 and 1e4 only")
    parser.add_argument("--sizes", type=int, nargs="*", help="override the node counts")
    parser.add_argument("--updates", type=int, default=6, help="updates per size (first cold, rest warm)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--blas-threads", type=int, default=1,
                        help="BLAS/OpenMP threads per run (1: on a shared 2-core machine a second thread spins and slows down)")
    parser.add_argument("--sklearn-timeout", type=int, default=None, help="seconds before a scikit-learn run is stopped")
    parser.add_argument("--worker", choices=("dsca", "sklearn"), help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(args)
    sizes = args.sizes or ([1_000, 10_000] if args.quick else [1_000, 10_000, 100_000, 1_000_000])
    timeout = args.sklearn_timeout or (120 if args.quick else 900)
    name = "dsca_scaling_quick" if args.quick else "dsca_scaling"
    RESULTS.mkdir(exist_ok=True)
    meta = {"updates": args.updates, "blas_threads": args.blas_threads,
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, shared with other jobs"}
    rows, sklearn_alive = [], True
    with open(RESULTS / f"{name}.jsonl", "w") as out:
        for size in sizes:
            for method in ("dsca", "sklearn"):
                if method == "sklearn" and not sklearn_alive:
                    row = {"method": "sklearn", "n_nodes": size, "status": "skipped (previous size hit the time limit)"}
                else:
                    row = launch(method, size, args, timeout if method == "sklearn" else 3600)
                if method == "sklearn" and row["status"] != "ok":
                    sklearn_alive = False
                rows.append(row)
                out.write(json.dumps(row) + "\n")
                out.flush()
                print(json.dumps({k: v for k, v in row.items() if k not in ("update_s", "lobpcg_iters")}), flush=True)
    (RESULTS / f"{name}.md").write_text(markdown(rows, meta))
    print((RESULTS / f"{name}.md").read_text())


if __name__ == "__main__":
    main()
