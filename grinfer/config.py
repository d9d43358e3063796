"""Typed, validated model configuration and the named presets.

Kept free of torch so that the CLI and serving layers can read configs cheaply.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

MaskMode = Literal["dynamic", "causal"]
Normalizer = Literal["max_len", "visible"]


class ModelConfig(BaseModel):
    """Everything needed to rebuild a model from its weights (stored as a checkpoint's config.json)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = "custom"
    kind: Literal["mtgr", "hstu"] = "mtgr"  # mtgr: ranking with U/S/R/C tokens; hstu: causal retrieval
    num_layers: int = Field(2, ge=1)
    d_model: int = Field(64, ge=8)
    num_heads: int = Field(2, ge=1)
    max_seq_len: int = Field(256, ge=8)  # the constant normaliser and the relative-position range
    mask: MaskMode = "dynamic"  # "causal" = the plain causal mask (MTGR ablation, HSTU retrieval)
    group_ln: bool = True  # one LayerNorm per token group (U/S/R/C) instead of one for all
    normalizer: Normalizer = "visible"  # divide attention by visible-key count or by max_seq_len
    rel_bias: bool = False  # learned relative position + time-bucket attention bias
    num_time_buckets: int = Field(64, ge=2)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # vocabularies (set from the dataset when a model is created for it)
    num_items: int = Field(4000, ge=1)
    num_genres: int = Field(18, ge=1)
    num_year_buckets: int = Field(19, ge=1)
    num_actions: int = Field(6, ge=1)  # 0 = none (candidates), 1..5 = ratings
    profile_cardinalities: tuple[int, ...] = (3, 8, 22, 101)
    num_cross_features: int = Field(4, ge=0)
    item_emb_dim: int = Field(32, ge=4)
    side_emb_dim: int = Field(8, ge=2)
    tasks: tuple[str, ...] = ("ctr", "ctcvr")
    # retrieval (hstu) training
    temperature: float = Field(0.05, gt=0.0)

    @model_validator(mode="after")
    def _check(self) -> ModelConfig:
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model ({self.d_model}) must be divisible by num_heads ({self.num_heads})")
        if self.kind == "hstu" and self.mask != "causal":
            raise ValueError("mask: an hstu (retrieval) model must use the causal mask")
        if self.kind == "mtgr" and not self.tasks:
            raise ValueError("tasks: an mtgr model needs at least one task")
        return self

    @property
    def head_dim(self) -> int:
        return self.d_model // self.num_heads

    def with_vocab(self, **vocab) -> ModelConfig:
        """Return a copy with dataset-dependent sizes (num_items, profile_cardinalities, ...) filled in."""
        return self.replace(**vocab)

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


class EngineConfig(BaseModel):
    """Inference-engine settings: KV cache sizing, batching limits, backend."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    backend: Literal["eager", "compiled", "fused"] = "eager"
    device: str = "cpu"
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    block_size: int = Field(32, ge=1)  # tokens per KV-cache block
    # device tier capacity: a byte count, or (on CUDA, when kv_cache_bytes is 0) a fraction of free memory
    kv_cache_bytes: int = Field(256 << 20, ge=0)
    gpu_memory_utilization: float = Field(0.5, gt=0.0, le=0.95)
    host_cache_bytes: int = Field(0, ge=0)  # 0 disables the host tier
    max_batch_tokens: int = Field(8192, ge=16)  # tokens computed per step (context + candidates)
    max_batch_requests: int = Field(64, ge=1)
    max_queue: int = Field(1024, ge=1)  # waiting requests beyond this are rejected (overload)
    max_realtime: int = Field(100, ge=0)  # R events per request (older ones must be rolled into S)
    cuda_graphs: bool = True  # fused backend on CUDA: replay the layer stack from a CUDA graph per shape bucket


class ServerConfig(BaseModel):
    """`grinfer serve` settings: flags > GRINFER_* environment > a TOML file > these defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    grpc_port: int = Field(50051, ge=0, le=65535)  # 0 = no gRPC server
    model: str | None = None  # checkpoint dir (a --task both output, or a ranking checkpoint); None = demo model
    store: str = "sqlite:///~/.cache/grinfer/grinfer.db"
    cache: str = "memory://"
    api_key: str | None = None
    device: str = "auto"
    backend: Literal["eager", "compiled", "fused"] = "eager"
    max_body_bytes: int = Field(1 << 20, ge=1024)
    max_queue: int = Field(256, ge=1)
    max_batch_tokens: int = Field(16384, ge=16)
    kv_cache_mb: int = Field(256, ge=1)
    user_ttl_s: float = Field(30.0, ge=0)
    log_level: str = "info"


def load_server_config(file: str | None = None, env: dict[str, str] | None = None, **flags) -> ServerConfig:
    """Merge a TOML file, GRINFER_<FIELD> environment variables and explicit flags (None = not given)."""
    import os
    import tomllib

    values: dict = {}
    if file:
        with open(os.path.expanduser(file), "rb") as fh:
            data = tomllib.load(fh)
        values.update(data.get("server", data))
    env = os.environ if env is None else env
    for name in ServerConfig.model_fields:
        key = f"GRINFER_{name.upper()}"
        if key in env:
            values[name] = env[key]
    values.update({k: v for k, v in flags.items() if v is not None})
    return ServerConfig.model_validate(values)
