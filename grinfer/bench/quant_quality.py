"""Quality of low precision against full precision: ranking AUC/GAUC through the engine (its KV-cache path)
and retrieval HR/NDCG@10 per precision setting, plus KV-cache users per GB by kv_dtype.

    python -m grinfer.bench.quant_quality --model DIR [--data DIR] [--users N] [--json OUT]

DIR is a `--task both` checkpoint (ranking/ and retrieval/). Ranking: each user's test window (the last
10 % of their events) scored as one cold engine request, so every key the attention reads went through the
pool in that setting's kv_dtype; the same AUC/GAUC as `grinfer eval`. Retrieval: the HSTU's full ranking over
the catalogue (its forward does not read the paged pool, so kv_dtype does not apply).
"""

from __future__ import annotations

import argparse
import copy
import json
from pathlib import Path

import numpy as np
import torch

from grinfer.config import EngineConfig, preset
from grinfer.data.types import Dataset
from grinfer.engine import EngineCore, RankRequest
from grinfer.engine.kv_pool import KVPool
from grinfer.model.quantize_dense import quantize_dense
from grinfer.train.metrics import auc, gauc
from grinfer.train.ranking import ContextLimits, evaluation_requests
from grinfer.train.retrieval import evaluate_retrieval

SETTINGS = [("full precision", "none", "model"), ("int8 dense", "int8", "model"),
            ("int8-dynamic dense", "int8-dynamic", "model"), ("int8 KV", "none", "int8"),
            ("fp8 KV (emulated on CPU)", "none", "fp8"), ("int8 dense + int8 KV", "int8", "int8")]
CHUNK = 256  # requests admitted at a time (under the engine's queue limit)


def engine_ranking(model, ds: Dataset, dense: str, kv_dtype: str, users: int | None) -> dict:
    """Per-task AUC and GAUC of the test windows, scored through an EngineCore in this precision."""
    model = copy.deepcopy(model)  # dense quantisation changes the model in place
    reqs = evaluation_requests(ds, model.cfg.tasks, ContextLimits(), "test")[:users]
    config = EngineConfig.model_validate({"dense": dense, "kv_dtype": kv_dtype, "kv_cache_bytes": 256 << 20,
                                          "pipeline_depth": 1})
    core = EngineCore(model, ds.catalog, config)
    probs: dict[str, torch.Tensor] = {}
    for start in range(0, len(reqs), CHUNK):
        for i, r in enumerate(reqs[start:start + CHUNK], start):
            core.add(RankRequest(f"user{i}", 0, r.context, r.candidates, r.request_ts))
        for state, result in core.run_until_done():
            if isinstance(result, Exception):
                raise result
            probs[state.request.user] = result.probabilities
    s = np.concatenate([probs[f"user{i}"].numpy() for i in range(len(reqs))])
    y = np.concatenate([r.labels for r in reqs if r.labels is not None])
    g = np.repeat(np.arange(len(reqs)), [len(r.candidates) for r in reqs])
    return {t: {"auc": auc(y[:, j], s[:, j]), "gauc": gauc(y[:, j], s[:, j], g)} for j, t in enumerate(model.cfg.tasks)}


def retrieval_quality(model, ds: Dataset, dense: str) -> dict:
    """HR@10 / NDCG@10 of the retrieval HSTU with its projections in `dense`."""
    m = quantize_dense(copy.deepcopy(model).eval(), dense)
    with torch.inference_mode():
        r = evaluate_retrieval(m, ds, "test", "cpu", ks=(10,))
    return {"hr@10": r["hr@10"], "ndcg@10": r["ndcg@10"]}


def users_per_gb() -> list[dict]:
    """Users whose whole context fits one GB of KV cache, per preset x model dtype x kv_dtype (the pool's own
    byte count per token: 8-bit values plus a float32 scale per token and head)."""
    rows = []
    for name, preset_name, tokens in (("R2 (mtgr-small)", "mtgr-small", 16 + 200 + 20),
                                      ("R1 (mtgr-large)", "mtgr-large", 16 + 1000 + 100)):
        cfg = preset(preset_name)
        for dtype in (torch.float32, torch.bfloat16):
            for kv in ("model", "int8", "fp8"):
                per_token = KVPool.bytes_per_token(cfg.num_layers, cfg.num_heads, cfg.head_dim, dtype, kv)
                rows.append({"workload": name, "dtype": str(dtype).removeprefix("torch."), "kv_dtype": kv,
                             "bytes_per_user": per_token * tokens, "users_per_gb": int(1e9 // (per_token * tokens))})
    return rows


def run(model_dir: Path, data: str | None, users: int | None) -> dict:
    """Every setting's ranking and retrieval quality, with deltas against full precision, and users per GB."""
    from grinfer import load
    from grinfer.train.run import checkpoint_dirs, load_matching_dataset

    dirs = checkpoint_dirs(model_dir)
    models = {m.cfg.kind: m for m in (load(d, map_location="cpu") for d in dirs)}
    ds = load_matching_dataset(data, dirs, [m.cfg for m in models.values()])
    rows = []
    for label, dense, kv in SETTINGS:
        row: dict = {"setting": label, "dense": dense, "kv_dtype": kv}
        if "mtgr" in models:
            row["ranking"] = engine_ranking(models["mtgr"], ds, dense, kv, users)
        if "hstu" in models and kv == "model":
            row["retrieval"] = retrieval_quality(models["hstu"], ds, dense)
        rows.append(row)
    return {"settings": rows, "users_per_gb": users_per_gb(), "users": users or len(ds.users)}


def format_report(result: dict) -> str:
    """Quality per setting with deltas against the first (full precision), then users per GB."""
    rows = result["settings"]
    base = rows[0]
    lines = [f"{'setting':<26}{'task':<7}{'AUC':>8}{'GAUC':>8}{'ΔAUC':>9}{'ΔGAUC':>9}   {'HR@10':>7}{'NDCG@10':>8}"
             f"{'ΔHR@10':>9}{'ΔNDCG@10':>10}"]
    for row in rows:
        retr = row.get("retrieval")
        for n, (task, m) in enumerate(row.get("ranking", {}).items()):
            b = base["ranking"][task]
            line = (f"{row['setting'] if n == 0 else '':<26}{task:<7}{m['auc']:>8.4f}{m['gauc']:>8.4f}"
                    f"{m['auc'] - b['auc']:>+9.4f}{m['gauc'] - b['gauc']:>+9.4f}")
            if n == 0 and retr is not None:
                br = base["retrieval"]
                line += (f"   {retr['hr@10']:>7.4f}{retr['ndcg@10']:>8.4f}{retr['hr@10'] - br['hr@10']:>+9.4f}"
                         f"{retr['ndcg@10'] - br['ndcg@10']:>+10.4f}")
            elif n == 0:
                line += "   (retrieval reads no KV cache: as full precision)"
            lines.append(line)
    lines += ["", f"{'KV cache':<18}{'dtype':<10}{'kv_dtype':<10}{'bytes/user':>12}{'users/GB':>10}"]
    lines += [f"{r['workload']:<18}{r['dtype']:<10}{r['kv_dtype']:<10}{r['bytes_per_user']:>12,}"
              f"{r['users_per_gb']:>10,}" for r in result["users_per_gb"]]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Quality of low precision against full precision, and KV users "
                                                 "per GB.")
    parser.add_argument("--model", type=Path, required=True, help="a --task both checkpoint directory")
    parser.add_argument("--data", help="dataset spec (default: the one the model was trained on)")
    parser.add_argument("--users", type=int, help="rank only the first N users' test windows")
    parser.add_argument("--json", type=Path, help="write the result JSON here")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    result = run(args.model, args.data, args.users)
    print(format_report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
