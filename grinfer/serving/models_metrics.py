"""Prometheus families of a model set, read from its plain stats (`ModelSet.describe()`, under the engine
stats' "models" key) at scrape time: per-arm requests and engine latency, the loaded versions, swaps,
shadow comparisons and the online KV consistency check, labelled by `model_version` (and `arm`)."""

from __future__ import annotations

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

SHADOW = {"rank_correlation": "Mean Spearman rank correlation of the shadow version's scores with production's",
          "mean_abs_delta": "Mean absolute fused-score difference, shadow minus production",
          "max_abs_delta": "Largest absolute fused-score difference, shadow minus production"}
CONSISTENCY = {"checks": "Ranked requests recomputed uncached in the background and compared",
               "exceeded": "Consistency checks whose difference exceeded the dtype's tolerance",
               "dropped": "Sampled consistency checks dropped (busy, or another one pending)"}


def model_set_metrics(stats: dict):
    """The families of stats["models"]; nothing when the engine is not a model set."""
    models = stats.get("models")
    if not models:
        return
    yield from _arm_families(models["arms"])
    info = GaugeMetricFamily("grinfer_model_version_info", "1 per loaded model version, with its role "
                             "(production, arm, shadow, draining) and KV-cache share", labels=["model_version", "role",
                                                                                               "kv_share"])
    for v in models["versions"]:
        info.add_metric([v["model_version"], v["role"], f"{v['kv_share']:.3f}"], 1.0)
    yield info
    yield CounterMetricFamily("grinfer_model_swaps", "Serving-plan switches (promotions, experiments)",
                              len(models["swaps"]))
    if models["swaps"]:
        last = models["swaps"][-1]
        yield GaugeMetricFamily("grinfer_model_swap_load_seconds", "Load and warm-up time of the last swap",
                                last["load_s"])
        yield GaugeMetricFamily("grinfer_model_swap_drain_seconds", "Drain time of the last swap's old versions",
                                last["drain_s"])
    yield from _consistency_families(models["versions"])
    if models["shadow"] is not None:
        yield from _shadow_families(models["shadow"])


def _arm_families(arms: list[dict]):
    labels = ["arm", "model_version"]
    requests = CounterMetricFamily("grinfer_arm_requests", "Ranked requests answered, by A/B arm", labels=labels)
    errors = CounterMetricFamily("grinfer_arm_errors", "Ranked requests that failed, by A/B arm", labels=labels)
    latency = HistogramMetricFamily("grinfer_arm_engine_seconds", "Engine time of ranked requests, by A/B arm",
                                    labels=labels)
    for a in arms:
        key, edges = [a["arm"], a["model_version"]], [*(str(b) for b in a["edges"]), "+Inf"]
        requests.add_metric(key, a["requests"])
        errors.add_metric(key, a["errors"])
        cumulative, running = [], 0
        for edge, count in zip(edges, a["buckets"]):
            running += count
            cumulative.append((edge, running))
        latency.add_metric(key, cumulative, a["seconds_sum"])
    yield from (requests, errors, latency)


def _consistency_families(versions: list[dict]):
    checked = [v for v in versions if v["consistency"] is not None]
    if not checked:
        return
    diff = GaugeMetricFamily("grinfer_kv_consistency_max_abs_diff", "Largest |cached - uncached| probability seen "
                             "by the online consistency check", labels=["model_version"])
    counters = {name: CounterMetricFamily(f"grinfer_kv_consistency_{name}", doc, labels=["model_version"])
                for name, doc in CONSISTENCY.items()}
    for v in checked:
        diff.add_metric([v["model_version"]], v["consistency"]["max_abs_diff"])
        for name, family in counters.items():
            family.add_metric([v["model_version"]], v["consistency"][name])
    yield diff
    yield from counters.values()


def _shadow_families(shadow: dict):
    label = [shadow["model_version"]]
    for name, doc in (("compared", "Sampled requests the shadow version scored and compared"),
                      ("dropped", "Sampled shadow copies dropped (busy, or too many pending)")):
        family = CounterMetricFamily(f"grinfer_shadow_{name}", doc, labels=["model_version"])
        family.add_metric(label, shadow[name])
        yield family
    for name, doc in SHADOW.items():
        if shadow[name] is not None:
            family = GaugeMetricFamily(f"grinfer_shadow_{name}", doc, labels=["model_version"])
            family.add_metric(label, shadow[name])
            yield family
