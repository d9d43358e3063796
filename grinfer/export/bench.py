"""Export timings and exported-vs-eager latency on the CPU demo models (`python -m grinfer.export.bench`).

Exports the demo checkpoints (trained and cached on first use, as `grinfer demo` does) to ONNX and
AOTInductor, then times, at the CPU-demo shape (B = 8 users, 4 profile + 60 S + 20 R tokens, 100
candidates; warm: 2 new R events over a cached context): the uncached ranking forward (eager,
ONNX Runtime, AOTI, each from a featurized batch to jagged probabilities), the retrieval forward
(eager, ONNX Runtime) and the cached step (the same step module in eager PyTorch vs its AOTI
package). Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import onnxruntime as ort
import torch

from grinfer import load
from grinfer.config import grinfer_home
from grinfer.export.aoti_runtime import AotiModel
from grinfer.export.export import export_checkpoint
from grinfer.export.onnx_runtime import OnnxModel
from grinfer.export.samples import random_catalog, ranking_batch, retrieval_sample
from grinfer.export.step import STEP_INPUTS, CachedStep
from grinfer.export.step_sample import step_sample
from grinfer.model.hstu import HSTURetrieval
from grinfer.model.mtgr import MTGR

USERS, STATIC, REALTIME, CANDIDATES, NEW_EVENTS = 8, 60, 20, 100, 2


def timed(cases: list[Callable[[], object]], iters: int, warmup: int) -> list[dict[str, float]]:
    """p50 / p90 / mean milliseconds per case, the cases interleaved call by call (side by side under the
    same load), after `warmup` rounds."""
    times: list[list[float]] = [[] for _ in cases]
    for round_ in range(warmup + iters):
        for fn, out in zip(cases, times):
            start = time.perf_counter()
            fn()
            if round_ >= warmup:
                out.append((time.perf_counter() - start) * 1e3)
    return [{"p50_ms": statistics.median(t), "p90_ms": sorted(t)[int(0.9 * (len(t) - 1))],
             "mean_ms": statistics.fmean(t)} for t in times]


def run(model_dir: Path, work: Path, iters: int, warmup: int, threads: int, block_size: int) -> dict:
    """Export, then time every graph against eager; the JSON report."""
    torch.set_num_threads(threads)
    ranking_dir = model_dir / "ranking"
    exports = [*export_checkpoint(model_dir, work / "demo.onnx", "onnx", progress=False),
               *export_checkpoint(ranking_dir, work / "demo.pt2", "aoti", block_size=block_size, progress=False)]
    paths = {(e.path.suffix, e.part): e.path for e in exports}
    ranker, retriever = load(ranking_dir), load(model_dir / "retrieval")
    if not isinstance(ranker, MTGR) or not isinstance(retriever, HSTURetrieval):
        raise SystemExit(f"{model_dir}: expected an MTGR checkpoint in ranking/ and an HSTU one in retrieval/")
    batch = ranking_batch(ranker.cfg, random_catalog(ranker.cfg), [(STATIC, REALTIME, CANDIDATES)] * USERS, seed=1)
    onnx_rank = OnnxModel(paths[".onnx", "ranking"], threads=threads)
    onnx_retrieval = OnnxModel(paths[".onnx", "retrieval"], threads=threads)
    aoti_rank, aoti_step = AotiModel(paths[".pt2", "ranking"]), AotiModel(paths[".pt2", "step"])
    sequences = retrieval_sample(retriever.cfg, [retriever.cfg.max_seq_len] * USERS, seed=2)
    context = len(ranker.cfg.profile_cardinalities) + STATIC + REALTIME
    step_in, _ = step_sample(ranker, batch, [context - NEW_EVENTS] * USERS, block_size, seed=3)
    eager_step = CachedStep(ranker, block_size)

    no_grad = torch.inference_mode()
    cases = [
        ("ranking, uncached", "eager", no_grad(lambda: torch.sigmoid(ranker(batch)))),
        ("ranking, uncached", f"onnxruntime ({onnx_rank.provider})", lambda: onnx_rank.rank(batch)),
        ("ranking, uncached", "aoti", no_grad(lambda: aoti_rank.rank(batch))),
        ("ranking, cached step", "eager (step module)",
         no_grad(lambda: eager_step(*(step_in[k] for k in STEP_INPUTS)))),
        ("ranking, cached step", "aoti", no_grad(lambda: aoti_step.run(step_in))),
        ("retrieval", "eager", no_grad(lambda: retriever.user_embedding(sequences) @ retriever.item_table().T)),
        ("retrieval", f"onnxruntime ({onnx_retrieval.provider})", lambda: onnx_retrieval.retrieve(sequences)),
    ]
    rows = [{"graph": graph, "runtime": runtime, "batch": USERS, **stats}
            for (graph, runtime, _), stats in zip(cases, timed([fn for _, _, fn in cases], iters, warmup))]
    for row in rows:
        base = next(r for r in rows if r["graph"] == row["graph"] and r["runtime"].startswith("eager"))
        row["speedup_vs_eager"] = base["p50_ms"] / row["p50_ms"]
    return {"exports": [{"file": e.path.name, "part": e.part, "export_s": round(e.export_s, 1),
                         "verify_s": round(e.verify_s, 2), "max_error": max(e.max_error.values())} for e in exports],
            "latency": rows,
            "shape": {"users": USERS, "static": STATIC, "realtime": REALTIME, "candidates": CANDIDATES,
                      "new_events": NEW_EVENTS, "block_size": block_size},
            "env": {"threads": threads, "torch": torch.__version__, "onnxruntime": ort.__version__,
                    "cpu": platform.processor() or platform.machine()}}


def format_report(report: dict) -> str:
    """The two tables: export times, then latency per graph and runtime."""
    lines = [f"{'file':<24}{'graph':<12}{'export s':>10}{'max err':>10}"]
    lines += [f"{e['file']:<24}{e['part']:<12}{e['export_s']:>10.1f}{e['max_error']:>10.1e}" for e in report["exports"]]
    lines += ["", f"{'graph':<22}{'runtime':<36}{'B':>3}{'p50 ms':>9}{'p90 ms':>9}{'x eager':>9}"]
    lines += [f"{r['graph']:<22}{r['runtime']:<36}{r['batch']:>3}{r['p50_ms']:>9.2f}{r['p90_ms']:>9.2f}"
              f"{r['speedup_vs_eager']:>9.2f}" for r in report["latency"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", type=Path, help="A ranking/ + retrieval/ directory (default: the demo models, "
                                                    "trained on first use)")
    parser.add_argument("--iters", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch and ONNX Runtime intra-op threads")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--json", type=Path, default=Path("export-bench.json"))
    args = parser.parse_args(argv)
    model_dir = args.model
    if model_dir is None:
        from grinfer.cli import demo_model_dir
        from grinfer.train.run import ensure_demo_models

        model_dir = ensure_demo_models(demo_model_dir(grinfer_home()), "cpu")
    with tempfile.TemporaryDirectory() as work:
        report = run(model_dir, Path(work), args.iters, args.warmup, args.threads, args.block_size)
    print(format_report(report))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
