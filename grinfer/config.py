"""Typed, validated model configuration and the named presets.

Kept free of torch so that the CLI and serving layers can read configs cheaply.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import UnionType
from typing import Annotated, Literal, Union, get_args, get_origin

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError, field_validator, model_validator

MaskMode = Literal["dynamic", "causal"]
Normalizer = Literal["max_len", "visible"]


CONVENTION_FIELDS = ("attn_alpha", "ln_affine", "ln_eps", "uvqk_bias", "qk_dim", "v_dim", "rel_pos_reach",
                     "time_bias_from", "layer_dropout", "output_norm", "norm_eps")


class ModelConfig(BaseModel):
    """Everything needed to rebuild a model from its weights (stored as a checkpoint's config.json)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "custom"
    kind: Literal["mtgr", "hstu"] = "mtgr"  # mtgr: ranking with U/S/R/C tokens; hstu: causal retrieval
    num_layers: int = Field(default=2, ge=1)
    d_model: int = Field(default=64, ge=8)
    num_heads: int = Field(default=2, ge=1)
    max_seq_len: int = Field(default=256, ge=8)  # the constant normaliser and the relative-position range
    mask: MaskMode = "dynamic"  # "causal" = the plain causal mask (MTGR ablation, HSTU retrieval)
    group_ln: bool = True  # one LayerNorm per token group (U/S/R/C) instead of one for all
    normalizer: Normalizer = "visible"  # divide attention by visible-key count or by max_seq_len
    rel_bias: bool = False  # learned relative position + time-bucket attention bias
    num_time_buckets: int = Field(default=64, ge=2)
    dropout: float = Field(default=0.0, ge=0.0, lt=1.0)
    # vocabularies (set from the dataset when a model is created for it)
    num_items: int = Field(default=4000, ge=1)
    num_genres: int = Field(default=18, ge=1)
    num_year_buckets: int = Field(default=19, ge=1)
    num_actions: int = Field(default=6, ge=1)  # 0 = none (candidates), 1..5 = ratings
    profile_cardinalities: tuple[int, ...] = (3, 8, 22, 101)
    num_cross_features: int = Field(default=4, ge=0)
    item_emb_dim: int = Field(default=32, ge=4)
    # rows of a hashed item table keyed by raw item ids (grinfer.embedding); None = one row per catalogue item
    item_table_rows: int | None = Field(default=None, ge=1)
    side_emb_dim: int = Field(default=8, ge=2)
    tasks: tuple[str, ...] = ("ctr", "ctcvr")
    # retrieval (hstu) training
    temperature: float = Field(default=0.05, gt=0.0)
    # conventions; the defaults are grinfer's own, `grinfer import-checkpoint` sets those of Meta's
    # generative-recommenders (its research HSTU) so that its checkpoints compute the same outputs
    # q.k scale; None = 1/sqrt(qk_dim); generative-recommenders: 1
    attn_alpha: float | None = Field(default=None, gt=0.0)
    ln_affine: bool = True  # LayerNorms with a learned scale and shift (generative-recommenders: none)
    ln_eps: float = Field(default=1e-5, gt=0.0)  # generative-recommenders: 1e-6
    uvqk_bias: bool = True  # bias on the U/V/Q/K projection (generative-recommenders: none)
    qk_dim: int | None = Field(default=None, ge=1)  # per-head Q/K width (their dqk); None = d_model / num_heads
    v_dim: int | None = Field(default=None, ge=1)  # per-head U/V width (their dv); None = d_model / num_heads
    # relative positions clamped to +-reach: a 2 * reach + 1 table;
    rel_pos_reach: int | None = Field(default=None, ge=1)
    #   None = max_seq_len; generative-recommenders: max_seq_len - 1 (its 2N - 1 table)
    time_bias_from: Literal["query", "next"] = "query"  # time-bias dt = ts[query] - ts[key], or "next":
    #   ts[query + 1] - ts[key], the next event's timestamp (generative-recommenders)
    layer_dropout: Literal["around_out", "before_out"] = "around_out"  # dropout before and after W_o, or only
    #   before it (generative-recommenders)
    output_norm: Literal["l2", "layer_norm"] = "l2"  # retrieval output embedding: L2 or LayerNorm (no affine)
    norm_eps: float = Field(default=1e-12, gt=0.0)  # epsilon of the output (and item) normalisation; theirs: 1e-6

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        if self.kind == "hstu" and self.item_table_rows is not None:
            raise ValueError("item_table_rows: retrieval scores every catalogue item; only mtgr models take a "
                             "hashed item table")
        if self.kind == "hstu" and self.mask != "causal":
            raise ValueError("mask: an hstu (retrieval) model must use the causal mask")
        if self.kind == "mtgr" and not self.tasks:
            raise ValueError("tasks: an mtgr model needs at least one task")
        if self.kind == "mtgr":
            changed = [f for f in CONVENTION_FIELDS if getattr(self, f) != type(self).model_fields[f].default]
            if changed:
                raise ValueError(f"{changed[0]}: the convention options ({', '.join(CONVENTION_FIELDS)}) are for "
                                 "hstu retrieval models; the ranking engine computes grinfer's own conventions")
        if self.rel_pos_reach is not None and self.rel_pos_reach > self.max_seq_len:
            raise ValueError(f"rel_pos_reach ({self.rel_pos_reach}) must be <= max_seq_len ({self.max_seq_len})")
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    @property
    def head_qk_dim(self) -> int:
        """Per-head width of Q and K."""
        return self.qk_dim or self.head_dim

    @property
    def head_v_dim(self) -> int:
        """Per-head width of U and V."""
        return self.v_dim or self.head_dim

    def with_vocab(self, **vocab) -> ModelConfig:
        """Return a copy with dataset-dependent sizes (num_items, profile_cardinalities, ...) filled in."""
        return self.replace(**vocab)

    def vocab_mismatch(self, num_items: int, num_genres: int, num_year_buckets: int,
                       profile_cardinalities: tuple[int, ...] | None = None) -> str | None:
        """Why a catalogue (and, given, profile fields) of these sizes cannot be scored by this model, or None."""
        sizes: list[tuple[str, object, object]] = [("items", num_items, self.num_items),
                                                   ("genres", num_genres, self.num_genres)]
        if profile_cardinalities is not None:
            sizes.append(("profile cardinalities", tuple(profile_cardinalities), self.profile_cardinalities))
        for what, data, model in sizes:
            if data != model:
                return f"it has {data} {what} but the model was trained on {model}"
        if num_year_buckets > self.num_year_buckets:
            return f"it has {num_year_buckets} year buckets but the model knows {self.num_year_buckets}"
        return None

    def replace(self, **changes) -> ModelConfig:
        """A validated copy with some fields changed (errors name the field)."""
        return type(self).model_validate({**self.model_dump(), **changes})


PRESETS: dict[str, ModelConfig] = {
    "mtgr-tiny": ModelConfig(name="mtgr-tiny", num_layers=2, d_model=32, num_heads=2, item_emb_dim=16),
    "mtgr-small": ModelConfig(name="mtgr-small", num_layers=3, d_model=512, num_heads=2, max_seq_len=1664,
                              item_emb_dim=64, side_emb_dim=16),
    "mtgr-medium": ModelConfig(name="mtgr-medium", num_layers=5, d_model=768, num_heads=3, max_seq_len=1664,
                               item_emb_dim=64, side_emb_dim=16),
    "mtgr-large": ModelConfig(name="mtgr-large", num_layers=15, d_model=768, num_heads=3, max_seq_len=1664,
                              item_emb_dim=64, side_emb_dim=16),
    # mtgr-large's dense stack over a 125 M-row hashed item table: 8.05e9 parameters, 9 GB in int8 rows
    "mtgr-8b": ModelConfig(name="mtgr-8b", num_layers=15, d_model=768, num_heads=3, max_seq_len=1664,
                           item_emb_dim=64, side_emb_dim=16, item_table_rows=125_000_000),
    "hstu-ml1m": ModelConfig(name="hstu-ml1m", kind="hstu", num_layers=2, d_model=50, num_heads=1,
                             max_seq_len=200, mask="causal", group_ln=False, normalizer="max_len",
                             rel_bias=True, dropout=0.2, item_emb_dim=50, num_cross_features=0, tasks=()),
}


def preset(name: str) -> ModelConfig:
    """Look up a preset by name; unknown names list the valid ones."""
    try:
        return PRESETS[name]
    except KeyError:
        raise ValueError(f"preset: unknown preset {name!r}; choose one of {', '.join(PRESETS)}") from None


@dataclass(frozen=True)
class Mib:
    """Marks a byte count that `grinfer serve` takes in MiB, under this name (flags, GRINFER_*, [engine])."""

    name: str


class EngineSettings(BaseModel):
    """The engine's tunable settings: `grinfer serve` takes them as its [engine] table (flags and GRINFER_*
    too); `EngineConfig` adds what whoever builds the engine decides."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: Literal["auto", "eager", "compiled", "fused", "aoti", "onnx", "baseline"] = Field(
        default="eager", description="auto (probe every backend the device offers, serve the fastest that agrees "
                                     "with eager), eager, compiled, fused (CUDA), aoti (the AOTInductor-packaged "
                                     "cached step, CPU), onnx (ONNX Runtime, uncached) "
                                     "or baseline (the uncached model)")
    block_size: int = Field(default=32, ge=1, description="tokens per KV-cache page")
    kv_cache_bytes: Annotated[int, Mib("kv_cache_mb")] = Field(
        default=256 << 20, ge=0, description="the device tier of the KV cache (0: on CUDA, "
                                             "gpu_memory_utilization of the free memory)")
    gpu_memory_utilization: float = Field(default=0.5, gt=0.0, le=0.95,
                                          description="share of free CUDA memory a KV cache sized 0 takes")
    # the retrieval model's history K/V (engine/retrieval_cache.py)
    retrieval_cache_bytes: Annotated[int, Mib("retrieval_cache_mb")] = Field(
        default=64 << 20, ge=0, description="the retrieval model's history K/V, a pool of its own (0: every "
                                            "window computed whole)")
    host_cache_bytes: Annotated[int, Mib("kv_host_mb")] = Field(
        default=0, ge=0, description="the host-memory tier of the KV cache, pinned on CUDA (0: none)")
    # memory-mapped files under EngineConfig.disk_cache_dir/<model fingerprint>
    disk_cache_bytes: Annotated[int, Mib("kv_disk_mb")] = Field(
        default=0, ge=0, description="the disk tier of the KV cache, files under GRINFER_HOME/kv kept "
                                     "across restarts (0: none)")
    pipeline_depth: int = Field(default=2, ge=1, le=2, description="engine steps in flight: 1 plans, runs and "
                                                                   "waits (synchronous), 2 plans step N+1 while N runs")
    # off by default: with few cores the two threads' OpenMP teams contend, and a CPU-demo step took 2.5x
    # longer on 2 cores
    cpu_device_thread: bool = Field(default=False, description="on the CPU, run a pipelined step's device part on "
                                                               "a worker thread (the CPU's stream)")
    fallback: bool = Field(default=True, description="a step that fails (raises, non-finite outputs, past "
                                                     "step_timeout_s) re-runs on the next backend: the primary, "
                                                     "eager, baseline; false: its requests fail")
    step_timeout_s: float = Field(default=0.0, ge=0.0, description="seconds a pipelined CPU step may take before "
                                                                   "it counts as failed (0: no timeout)")
    max_batch_tokens: int = Field(default=8192, ge=16, description="tokens computed per engine step (context + "
                                                                   "candidates)")
    max_batch_requests: int = Field(default=64, ge=1, description="requests per engine step")
    max_queue: int = Field(default=1024, ge=1, description="waiting requests beyond this are rejected (429)")
    max_realtime: int = Field(default=100, ge=0, description="real-time events per request (older ones must be "
                                                             "rolled into the static history)")
    cuda_graphs: bool = Field(default=True, description="fused backend on CUDA: replay the layer stack from a CUDA "
                                                        "graph per shape bucket")
    # a request that arrives during a capture waits for it, so captures wait for a lull instead of filling
    # every gap between steps
    capture_idle_s: float = Field(default=0.25, ge=0.0, description="a new bucket's CUDA graph is captured once "
                                                                    "the engine has had no work for this long")
    # a capture delays the queue by its few milliseconds
    capture_busy_s: float = Field(default=1.0, ge=0.0, description="under load that never leaves such a lull, "
                                                                   "one bucket that 3 steps needed is captured "
                                                                   "between steps at most this often (0: only in "
                                                                   "lulls)")
    # grinfer.model.quantize_dense; None is resolved before an engine is built (serve: the checkpoint's mode)
    dense: Literal["none", "int8", "int8-dynamic", "fp8"] | None = Field(
        default="none", description="low-precision HSTU projections: none, int8 (weight-only), int8-dynamic or "
                                    "fp8 (row-wise; CUDA compute capability >= 8.9); unset: the checkpoint's "
                                    "(grinfer quantize --dense), else none")
    # grinfer.ops.reference.kv_quant: about 2x the users per byte of a bf16 pool
    kv_dtype: Literal["model", "int8", "fp8"] = Field(
        default="model", description="KV-cache storage: model (the model's dtype), int8 or fp8 (e4m3), 8-bit "
                                     "with a scale per token and head")

    def resolved(self, **decided) -> EngineConfig:
        """The engine's config: these settings with what the builder decided (device, dtype, export paths, the
        disk tier's directory, the backend `auto` chose, the checkpoint's `dense`); SettingError (one line)
        for what the engine does not accept."""
        try:
            return EngineConfig.model_validate({**self.model_dump(), **decided})
        except ValidationError as exc:
            raise SettingError(one_line_error(exc, EngineConfig, {})) from None


class EngineConfig(EngineSettings):
    """Everything an engine is built from: its settings, resolved (a backend, a dense mode), and what the
    builder decides: the device and dtype, export paths, the disk tier's directory."""

    onnx_path: str | None = None  # backend onnx: the exported ranking graph (grinfer export onnx)
    aoti_path: str | None = None  # backend aoti: the cached step's package (grinfer export aoti: OUT.step.pt2)
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    disk_cache_dir: str | None = None  # the disk tier's root

    @model_validator(mode="after")
    def _check(self) -> EngineConfig:
        if self.backend == "auto":
            raise ValueError("backend: auto is resolved before an engine is built (grinfer.engine.probe.choose)")
        if self.dense is None:
            raise ValueError("dense: unset (the checkpoint's mode) is resolved before an engine is built")
        if self.kv_cache_bytes == 0 and not self.device.startswith("cuda"):
            raise ValueError(f"kv cache: size 0 (a share of free CUDA memory) needs a CUDA device; give the "
                             f"{self.device} KV cache a size (grinfer serve: kv_cache_mb)")
        return self


LogLevel = Literal["critical", "error", "warning", "info", "debug"]
DEFAULT_HOME = "~/.cache/grinfer"


def grinfer_home(env: Mapping[str, str] | None = None) -> Path:
    """$GRINFER_HOME (default ~/.cache/grinfer): the root of every path grinfer writes by default."""
    env = os.environ if env is None else env
    return Path(env.get("GRINFER_HOME") or DEFAULT_HOME).expanduser()


def dataset_key(spec: str) -> str:
    """A file-name-safe key of a dataset spec (directory specs made absolute): readable slug + short hash."""
    name = spec if spec.startswith("synthetic") else os.path.abspath(os.path.expanduser(spec))
    slug = re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-")[-48:]
    return f"{slug}-{hashlib.sha1(name.encode()).hexdigest()[:8]}"


def default_store_url(data_spec: str, home: Path) -> str:
    """The SQLite store kept for one dataset: $GRINFER_HOME/stores/<dataset key>.db."""
    return f"sqlite://{(home / 'stores' / dataset_key(data_spec)).with_suffix('.db').resolve()}"


# grinfer serve's own defaults for these engine settings (the others are EngineSettings')
SERVE_ENGINE_DEFAULTS = {"backend": "auto", "dense": None, "max_queue": 256, "max_batch_tokens": 16384}


class ServerConfig(BaseModel):
    """`grinfer serve` settings: flags > GRINFER_<FIELD> environment > a TOML file > these defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    home: str | None = Field(default=None,
                             description=f"root of every default path (demo models, stores) [{DEFAULT_HOME}]")
    host: str = Field(default="127.0.0.1", description="bind address of REST and gRPC")
    port: int = Field(default=8000, ge=0, le=65535, description="REST port")
    grpc_port: int = Field(default=50051, ge=0, le=65535, description="gRPC port, 0 = no gRPC server")
    grpc_reuse_port: bool = Field(default=False, description="let several servers share the gRPC port (SO_REUSEPORT)")
    model: str | None = Field(default=None,
                              description="checkpoint dir (a --task both output or a ranking checkpoint); "
                                                "unset: the demo models, trained on first start")
    store: str | None = Field(default=None, description="sqlite:///PATH.db, a file path or postgresql://...; unset: "
                                                "GRINFER_HOME/stores/<the model's training dataset>.db")
    cache: str = Field(default="memory://", description="memory://[?max_entries=N] or redis://HOST:PORT/DB")
    api_key: str | None = Field(default=None, description="require this key (X-API-Key) on write and admin calls")
    device: str = Field(default="auto", pattern=r"^(auto|cpu|cuda(:\d+)?)$", description="cpu, cuda, cuda:N or auto")
    devices: str | None = Field(default=None, description="one engine per device in this server, users spread over "
                                "them by a consistent hash: cuda:0,cuda:1 (cpu,cpu for tests); unset: --device")
    max_body_bytes: int = Field(default=1 << 20, ge=1024, description="largest request body in bytes")
    user_ttl_s: float = Field(default=30.0,
                              ge=0, description="seconds a user record stays in the feature cache (0: none)")
    workers: int = Field(default=0,
                         ge=0, le=64, description="front-end worker processes beside the engine's own, on the "
                                                     "same port (HTTP, validation, store reads); 0 = one process")
    log_level: LogLevel = Field(default="info", description=", ".join(get_args(LogLevel)))
    latency_target_ms: int = Field(default=500, ge=0, le=600_000,
                                   description="admission: requests in flight are kept under the measured rate x "
                                               "this; past it a request gets 429 at once (0 = admit all)")
    access_log: bool = Field(default=False,
                             description="log one line per HTTP request (costs CPU at high request rates)")
    replica: str | None = Field(default=None, max_length=128, pattern=r"^[\x21-\x7e]+$",
                                description="this replica's name in X-Grinfer-Replica (unset: hostname:port)")
    # the model registry (grinfer/registry, grinfer/serving/models.py)
    model_name: str | None = Field(default=None, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                                   description="serve this registered model from the store's registry (its "
                                               "production version, its running experiment's arms and shadow) "
                                               "instead of --model; promotions apply while serving")
    kv_split: float = Field(default=0.25, ge=0.0, lt=1.0,
                            description="with model_name: the KV-cache share of the versions beside production "
                                        "(A/B arms, shadow), split evenly between them; production keeps the rest "
                                        "(0: every version gets the whole budget)")
    registry_poll_s: float = Field(default=5.0, ge=0.0,
                                   description="with model_name: seconds between reads of the registry for "
                                               "promotions and experiments (0: only POST /v1/admin/models/promote)")
    consistency_sample: float = Field(default=0.001, ge=0.0, le=1.0,
                                      description="fraction of ranked requests recomputed uncached in the "
                                                  "background to check the KV cache (0: off)")
    engine: EngineSettings = Field(default_factory=lambda: EngineSettings(**SERVE_ENGINE_DEFAULTS),
                                   description="the engine's settings ([engine] table); a mapping given here is "
                                               "merged over grinfer serve's defaults")

    @field_validator("engine", mode="before")
    @classmethod
    def _serve_defaults(cls, engine):
        return {**SERVE_ENGINE_DEFAULTS, **engine} if isinstance(engine, Mapping) else engine

    @field_validator("store")
    @classmethod
    def _check_store(cls, url: str | None) -> str | None:
        from grinfer.storage import STORE_SCHEMES

        if url is not None and "://" in url and url.split("://")[0].lower() not in STORE_SCHEMES:
            raise ValueError(f"unsupported store URL {url.split('://')[0]}://; use "
                             f"{', '.join(s + '://...' for s in STORE_SCHEMES)} or a file path")
        return url

    @field_validator("devices")
    @classmethod
    def _check_devices(cls, devices: str | None) -> str | None:
        if devices is None:
            return None
        names = [d.strip() for d in devices.split(",")]
        if not all(re.fullmatch(r"cpu|cuda:\d+", d) for d in names):
            raise ValueError(f"{devices!r}: a comma-separated list of cpu or cuda:N, such as cuda:0,cuda:1")
        if len({d.split(":")[0] for d in names}) > 1:
            raise ValueError(f"{devices!r}: every device must be of one type (all cuda:N, or all cpu)")
        cuda = [d for d in names if d != "cpu"]
        if len(set(cuda)) != len(cuda):
            raise ValueError(f"{devices!r}: a GPU is named twice; one engine per GPU")
        return ",".join(names)

    def device_list(self, device: str) -> list[str]:
        """The devices engines run on: `devices` when set, else the one resolved `device`."""
        return self.devices.split(",") if self.devices else [device]

    @field_validator("cache")
    @classmethod
    def _check_cache(cls, url: str) -> str:
        from grinfer.storage import CACHE_SCHEMES

        if url.split("://")[0].lower() not in CACHE_SCHEMES or "://" not in url:
            raise ValueError(f"unsupported cache URL; use {', '.join(s + '://...' for s in CACHE_SCHEMES)}")
        return url

    @property
    def replica_name(self) -> str:
        """The name a balanced fleet knows this replica by: `replica`, else hostname:port."""
        import socket

        return self.replica or f"{socket.gethostname()}:{self.port}"

    @property
    def home_dir(self) -> Path:
        """The GRINFER_HOME this configuration writes under."""
        return Path(self.home or DEFAULT_HOME).expanduser()

    def with_store_for(self, data_spec: str | None, model_path: Path) -> ServerConfig:
        """This config with `store` filled in when unset: the store kept for the model's training dataset
        (or, when the checkpoint records none, for the model directory)."""
        if self.store is not None:
            return self
        key = data_spec if data_spec is not None else str(model_path.resolve())
        return self.model_copy(update={"store": default_store_url(key, self.home_dir)})

    def compile_cache_env(self) -> dict[str, str]:
        """Where torch.compile (Inductor) and Triton keep their caches: under GRINFER_HOME/cache, as environment
        variables to set before torch is imported (a variable already set is the user's choice and wins)."""
        cache = self.home_dir / "cache"
        return {"TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"), "TRITON_CACHE_DIR": str(cache / "triton")}

    def describe(self, device: str, models: dict[str, Path | None]) -> str:
        """The start-up line: store, cache, model paths, device and backend (the API key never shown)."""
        from grinfer.storage import _redact

        paths = ", ".join(f"{name} {path or 'none'}" for name, path in models.items())
        return (f"store {_redact(self.store or '(unset)')}, cache {_redact(self.cache)}, {paths}, device {device}, "
                f"backend {self.engine.backend}, home {self.home_dir}")


class SettingError(ValueError):
    """A setting a user gave is not accepted; the message is one line naming where it came from."""


def mib_name(model: type[BaseModel], field: str) -> str | None:
    """The MiB name a byte-count field is given under (EngineSettings.kv_cache_bytes: kv_cache_mb), or None."""
    return next((m.name for m in model.model_fields[field].metadata if isinstance(m, Mib)), None)


# the names users give settings by (flags, GRINFER_<NAME>, --config keys): the server's own, then the engine's,
# whose byte counts are given in MiB (-> the EngineSettings field each one sets)
SERVER_SETTINGS = tuple(name for name in ServerConfig.model_fields if name != "engine")
ENGINE_SETTINGS = {mib_name(EngineSettings, field) or field: field for field in EngineSettings.model_fields}


def env_var(name: str) -> str:
    """The environment variable of a server setting."""
    return f"GRINFER_{name.upper()}"


_KINDS = {bool: "true or false", int: "an integer", float: "a number"}
_BOUNDS = {"ge": ">=", "gt": ">", "le": "<=", "lt": "<"}
_MIB = TypeAdapter(Annotated[int, Field(ge=0)])


def accepted(model: type[BaseModel], name: str) -> str:
    """What a field accepts, in words: 'an integer >= 0 and <= 65535', "one of 'eager', 'compiled'", ..."""
    info = model.model_fields[name]
    annotation = info.annotation
    if get_origin(annotation) in (Union, UnionType):  # X | None: what X accepts
        annotation = next(a for a in get_args(annotation) if a is not type(None))
    if get_origin(annotation) is Literal:
        return "one of " + ", ".join(repr(v) for v in get_args(annotation))
    kind = _KINDS.get(annotation)
    if kind is None:
        return info.description or "text"
    limits = [f"{op} {getattr(m, attr)}" for m in info.metadata for attr, op in _BOUNDS.items() if hasattr(m, attr)]
    return " ".join([kind, " and ".join(limits)]).strip()


def _field_of(model: type[BaseModel], loc: tuple) -> tuple[type[BaseModel], str]:
    """The model and field an error's location points at, through nested settings (ServerConfig.engine)."""
    path = [str(part) for part in loc]
    field = path.pop(0) if path else ""
    while path and field in model.model_fields:
        inner = model.model_fields[field].annotation
        if not (isinstance(inner, type) and issubclass(inner, BaseModel)):
            break
        model, field = inner, path.pop(0)
    return model, field


def _problem(where: str, message: str, name: str, accepts: str) -> str:
    return f"{where}: {message[0].lower()}{message[1:]}; {name} accepts {accepts}"


def one_line_error(exc: ValidationError, model: type[BaseModel], sources: Mapping[str, str]) -> str:
    """The first problem of a ValidationError as one line: where the value came from, what was wrong,
    what is accepted. `sources` maps a setting's name to how the user gave it ('--port', 'GRINFER_PORT=abc')."""
    err = exc.errors()[0]
    owner, field = _field_of(model, err["loc"])
    name = (mib_name(owner, field) or field) if field in owner.model_fields else field
    where = sources.get(name, name)
    if err["type"] == "extra_forbidden":
        return f"{where}: unknown setting {field!r}; known settings: {', '.join(owner.model_fields)}"
    message = err["msg"].removeprefix("Value error, ")
    if field not in owner.model_fields:
        return message
    if err["type"] == "value_error":  # a validator's own message, which says what is accepted
        return f"{where}: {message}"
    if err["type"] == "string_pattern_mismatch":
        message = "not accepted"
    return _problem(where, message, name, accepted(owner, field))


def _config_file(file: str) -> tuple[dict, dict]:
    """A --config file's server settings ([server], else the top level) and engine settings ([engine]), each
    key checked to be in its table."""
    import tomllib

    try:
        with open(os.path.expanduser(file), "rb") as fh:
            data = tomllib.load(fh)
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SettingError(f"--config {file}: {exc}") from None
    server = dict(data.get("server", data))
    tables = [t for t in (server.pop("engine", None), data.get("engine") if "server" in data else None) if t]
    if len(tables) > 1:
        raise SettingError(f"--config {file}: both [engine] and [server.engine]; give the engine's settings once")
    engine = tables[0] if tables else {}
    if not isinstance(engine, dict):
        raise SettingError(f"--config {file}: key 'engine': the engine's settings are a table, [engine]")
    for key, value in server.items():
        if key in ENGINE_SETTINGS:
            raise SettingError(f"--config {file}: key {key!r} is an engine setting; it belongs in the [engine] "
                               f"table ([engine] {key} = {value!r})")
        if key not in SERVER_SETTINGS:
            raise SettingError(f"--config {file}: key {key!r}: unknown setting {key!r}; known settings: "
                               f"{', '.join(SERVER_SETTINGS)} (the engine's in the [engine] table)")
    for key in engine:
        if key in SERVER_SETTINGS:
            raise SettingError(f"--config {file}: [engine] key {key!r} is a server setting; it belongs in the "
                               "[server] table")
        if key not in ENGINE_SETTINGS:
            raise SettingError(f"--config {file}: [engine] key {key!r}: unknown engine setting; known engine "
                               f"settings: {', '.join(ENGINE_SETTINGS)}")
    return server, engine


def _in_bytes(name: str, value, where: str) -> int:
    """A size given in MiB, as bytes."""
    try:
        return _MIB.validate_python(value) << 20
    except ValidationError as exc:
        raise SettingError(_problem(where, exc.errors()[0]["msg"], name, "an integer >= 0 (MiB)")) from None


def load_server_config(file: str | None = None, env: Mapping[str, str] | None = None, **flags) -> ServerConfig:
    """Merge a TOML file, GRINFER_<NAME> environment variables and explicit flags (None = not given), each by
    the settings' names (SERVER_SETTINGS, ENGINE_SETTINGS: byte counts in MiB).

    Raises SettingError (one line naming the flag, variable or file key) for anything not accepted."""
    values: dict = {}
    sources: dict[str, str] = {}
    if file:
        server, engine = _config_file(file)
        for table, data in (("", server), ("[engine] ", engine)):
            values.update(data)
            sources.update({k: f"--config {file}: {table}key {k!r}" for k in data})
    env = os.environ if env is None else env
    for name in (*SERVER_SETTINGS, *ENGINE_SETTINGS):
        if env_var(name) in env:
            values[name] = env[env_var(name)]
            sources[name] = f"{env_var(name)}={env[env_var(name)]}"
    given = {k: v for k, v in flags.items() if v is not None}
    values.update(given)
    sources.update({k: f"--{k.replace('_', '-')} {v}" for k, v in given.items()})
    engine = {field: values.pop(name) if name == field else _in_bytes(name, values.pop(name), sources[name])
              for name, field in ENGINE_SETTINGS.items() if name in values}
    try:
        return ServerConfig.model_validate({**values, "engine": engine})
    except ValidationError as exc:
        raise SettingError(one_line_error(exc, ServerConfig, sources)) from None


def setting_doc(name: str) -> tuple[str, str]:
    """A setting's description and its default as users give it (sizes in MiB, 'unset' for None)."""
    if name in SERVER_SETTINGS:
        info = ServerConfig.model_fields[name]
        return info.description or "", "unset" if info.default is None else str(info.default).lower()
    field = ENGINE_SETTINGS[name]
    description, default = EngineSettings.model_fields[field].description or "", getattr(ServerConfig().engine, field)
    if name != field:
        description, default = f"size in MiB of {description}", default >> 20
    return description, "unset" if default is None else str(default).lower()


def settings_help() -> str:
    """Every server and engine setting with its environment variable and default, for `grinfer serve --help`."""
    import textwrap

    docs = {name: setting_doc(name) for name in (*SERVER_SETTINGS, *ENGINE_SETTINGS)}
    width = 3 + max(len(f"{env_var(name)}={default}") for name, (_, default) in docs.items())

    def rows(names) -> list[str]:
        lines = []
        for name in names:
            description, default = docs[name]
            first = f"  {env_var(name)}={default}".ljust(width)
            lines += textwrap.wrap(description, 100, initial_indent=first, subsequent_indent=" " * width)
        return lines

    return "\n".join(["server ([server] table):", *rows(SERVER_SETTINGS), "", "engine ([engine] table):",
                      *rows(ENGINE_SETTINGS)])
