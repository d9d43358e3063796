"""Server configuration: defaults < TOML file < GRINFER_* environment < flags; the engine's settings are a
nested EngineSettings (the file's [engine] table, sizes in MiB), never repeated by the server; errors are one
line naming where the value came from; every default path lives under GRINFER_HOME."""

import re
from pathlib import Path

import pytest

from grinfer.config import (
    ENGINE_SETTINGS,
    SERVE_ENGINE_DEFAULTS,
    SERVER_SETTINGS,
    EngineConfig,
    EngineSettings,
    ServerConfig,
    SettingError,
    dataset_key,
    load_server_config,
    settings_help,
)


def test_precedence_file_env_flags(tmp_path):
    f = tmp_path / "grinfer.toml"
    f.write_text('[server]\nport = 9000\ngrpc_port = 9001\nstore = "sqlite:///from-file.db"\napi_key = "file"\n')
    cfg = load_server_config(str(f), env={"GRINFER_PORT": "9100", "GRINFER_API_KEY": "env"}, api_key="flag")
    assert cfg.port == 9100  # env beats file
    assert cfg.grpc_port == 9001  # file beats default
    assert cfg.store == "sqlite:///from-file.db"
    assert cfg.api_key == "flag"  # flag beats env
    assert cfg.cache == ServerConfig().cache  # default


def test_unset_flags_do_not_override(tmp_path):
    cfg = load_server_config(None, env={"GRINFER_BACKEND": "compiled"}, backend=None, port=None)
    assert cfg.engine.backend == "compiled" and cfg.port == 8000


def test_engine_settings_come_from_the_engine_table_env_and_flags_in_mib(tmp_path):
    f = tmp_path / "grinfer.toml"
    f.write_text('[server]\nport = 9000\n\n[engine]\nkv_cache_mb = 512\nkv_host_mb = 64\nbackend = "compiled"\n'
                 'max_queue = 8\n')
    cfg = load_server_config(str(f), env={"GRINFER_KV_HOST_MB": "128", "GRINFER_CUDA_GRAPHS": "false"},
                             pipeline_depth=1, kv_cache_mb=None)
    engine = cfg.engine
    assert cfg.port == 9000 and engine.backend == "compiled" and engine.max_queue == 8
    assert engine.kv_cache_bytes == 512 << 20  # file, MiB -> bytes
    assert engine.host_cache_bytes == 128 << 20 and engine.cuda_graphs is False  # env beats file
    assert engine.pipeline_depth == 1  # flag
    assert engine.max_batch_tokens == SERVE_ENGINE_DEFAULTS["max_batch_tokens"] and engine.dense is None


def test_without_a_server_table_the_top_level_is_the_servers_and_server_engine_works_too(tmp_path):
    top = tmp_path / "top.toml"
    top.write_text("port = 9000\n[engine]\nkv_disk_mb = 3\n")
    cfg = load_server_config(str(top), env={})
    assert cfg.port == 9000 and cfg.engine.disk_cache_bytes == 3 << 20
    nested = tmp_path / "nested.toml"
    nested.write_text("[server.engine]\nmax_queue = 3\n")
    assert load_server_config(str(nested), env={}).engine.max_queue == 3
    both = tmp_path / "both.toml"
    both.write_text("[server.engine]\nmax_queue = 3\n[engine]\nmax_queue = 4\n")
    with pytest.raises(SettingError, match="give the engine's settings once"):
        load_server_config(str(both), env={})


@pytest.mark.parametrize("text, message", [
    ("[server]\nkv_cache_mb = 512\n", "key 'kv_cache_mb' is an engine setting; it belongs in the [engine] table "
                                      "([engine] kv_cache_mb = 512)"),
    ("max_batch_tokens = 4096\n", "key 'max_batch_tokens' is an engine setting; it belongs in the [engine] table"),
    ("[engine]\nport = 1\n", "[engine] key 'port' is a server setting; it belongs in the [server] table"),
    ("[engine]\nkv_cache_bytes = 1\n", "[engine] key 'kv_cache_bytes': unknown engine setting; known engine "
                                       "settings: backend, block_size, kv_cache_mb,"),
    ("engine = 5\n", "key 'engine': the engine's settings are a table, [engine]"),
    ("[engine]\npipeline_depth = 3\n", "[engine] key 'pipeline_depth': input should be less than or equal to 2; "
                                       "pipeline_depth accepts an integer >= 1 and <= 2"),
])
def test_a_setting_in_the_wrong_table_or_out_of_range_names_the_file_key(tmp_path, text, message):
    f = tmp_path / "grinfer.toml"
    f.write_text(text)
    with pytest.raises(SettingError) as info:
        load_server_config(str(f), env={})
    assert f"--config {f}: {message}" in str(info.value)


@pytest.mark.parametrize("env, flags, message", [
    ({"GRINFER_PORT": "abc"}, {}, "GRINFER_PORT=abc: input should be a valid integer"),
    ({"GRINFER_PORT": "70000"}, {}, "port accepts an integer >= 0 and <= 65535"),
    ({"GRINFER_BACKEND": "fast"}, {}, "backend accepts one of 'auto', 'eager', 'compiled', 'fused'"),
    ({"GRINFER_MAX_QUEUE": "zero"}, {}, "GRINFER_MAX_QUEUE=zero"),
    ({"GRINFER_LOG_LEVEL": "loud"}, {}, "log_level accepts one of 'critical'"),
    ({"GRINFER_DEVICE": "gpu"}, {}, "device accepts cpu, cuda, cuda:N or auto"),
    ({}, {"store": "bogus://x"}, "--store bogus://x: unsupported store URL bogus://"),
    ({}, {"cache": "memcached://x"}, "--cache memcached://x: unsupported cache URL"),
    ({"GRINFER_PORT": "9000"}, {"port": -1}, "--port -1: input should be greater than or equal to 0"),
    ({"GRINFER_KV_CACHE_MB": "big"}, {}, "GRINFER_KV_CACHE_MB=big: input should be a valid integer, unable to parse "
                                         "string as an integer; kv_cache_mb accepts an integer >= 0 (MiB)"),
    ({}, {"kv_host_mb": -1}, "--kv-host-mb -1: input should be greater than or equal to 0; kv_host_mb accepts an "
                             "integer >= 0 (MiB)"),
    ({"GRINFER_DENSE": "int3"}, {}, "dense accepts one of 'none', 'int8', 'int8-dynamic', 'fp8'"),
    ({"GRINFER_FALLBACK": "maybe"}, {}, "GRINFER_FALLBACK=maybe: input should be a valid boolean"),
    ({"GRINFER_MAX_QUEUE": "0"}, {"max_queue": 5, "pipeline_depth": 0}, "--pipeline-depth 0: input should be "
                                                                        "greater than or equal to 1"),
])
def test_bad_values_are_one_line_naming_the_setting(env, flags, message):
    with pytest.raises(SettingError) as info:
        load_server_config(None, env=env, **flags)
    text = str(info.value)
    assert message in text and "\n" not in text and "pydantic" not in text


def test_unknown_file_key_is_rejected(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("prot = 1\n")
    with pytest.raises(SettingError) as info:
        load_server_config(str(f), env={})
    assert "bad.toml: key 'prot': unknown setting 'prot'; known settings: home, host" in str(info.value)
    assert "consistency_sample (the engine's in the [engine] table)" in str(info.value)


def test_a_missing_or_broken_file_is_a_setting_error(tmp_path):
    with pytest.raises(SettingError, match="--config"):
        load_server_config(str(tmp_path / "none.toml"), env={})
    (tmp_path / "broken.toml").write_text("port = \n")
    with pytest.raises(SettingError, match=r"broken\.toml"):
        load_server_config(str(tmp_path / "broken.toml"), env={})


def test_default_store_lives_under_grinfer_home_per_training_dataset(tmp_path):
    cfg = load_server_config(None, env={"GRINFER_HOME": str(tmp_path)})
    assert cfg.home_dir == tmp_path and cfg.store is None
    demo = cfg.with_store_for("synthetic:users=600,items=500", Path("m1"))
    other = cfg.with_store_for("synthetic", Path("m1"))
    assert demo.store.startswith(f"sqlite://{tmp_path}/stores/synthetic-users-600-items-500-")
    assert demo.store != other.store
    assert cfg.with_store_for("synthetic", Path("m2")).store == other.store  # same dataset, same store
    unrecorded = cfg.with_store_for(None, tmp_path / "imported")  # no training dataset recorded: keyed by the model
    assert unrecorded.store.startswith(f"sqlite://{tmp_path}/stores/") and "imported" in unrecorded.store
    explicit = load_server_config(None, env={"GRINFER_HOME": str(tmp_path), "GRINFER_STORE": "sqlite:///x.db"})
    assert explicit.with_store_for("synthetic", Path("m1")).store == "sqlite:///x.db"


def test_default_home(monkeypatch):
    monkeypatch.delenv("GRINFER_HOME", raising=False)
    assert load_server_config(None).home_dir == Path("~/.cache/grinfer").expanduser()


def test_dataset_key_makes_directories_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert dataset_key("ml-1m") == dataset_key(str(tmp_path / "ml-1m"))
    assert "/" not in dataset_key(str(tmp_path / "ml-1m"))


def test_describe_names_store_cache_models_device_backend_and_hides_passwords(tmp_path):
    cfg = ServerConfig(home=str(tmp_path), store="postgresql://me:secret@db/grinfer",
                       engine={"backend": "compiled"})
    line = cfg.describe("cuda:0", {"ranking": tmp_path / "r", "retrieval": None})
    for part in ("store postgresql://me:***@db/grinfer", "cache memory://", f"ranking {tmp_path / 'r'}",
                 "retrieval none", "device cuda:0", "backend compiled", f"home {tmp_path}"):
        assert part in line
    assert "secret" not in line


def test_settings_help_lists_every_setting_with_its_variable_and_sizes_in_mib():
    text = settings_help()
    for name in (*SERVER_SETTINGS, *ENGINE_SETTINGS):
        assert f"GRINFER_{name.upper()}=" in text
    assert "GRINFER_KV_CACHE_MB=256 " in text and "GRINFER_RETRIEVAL_CACHE_MB=64 " in text
    assert "GRINFER_MAX_QUEUE=256 " in text and "GRINFER_BACKEND=auto " in text and "GRINFER_DENSE=unset " in text
    assert text.index("[server] table") < text.index("GRINFER_PORT=") < text.index("[engine] table") \
        < text.index("GRINFER_KV_CACHE_MB=")


def test_the_server_repeats_no_engine_setting_and_every_engine_setting_has_one_name():
    assert not set(ServerConfig.model_fields) & set(EngineSettings.model_fields)
    assert not set(SERVER_SETTINGS) & set(ENGINE_SETTINGS)
    assert sorted(ENGINE_SETTINGS.values()) == sorted(EngineSettings.model_fields)
    assert set(EngineSettings.model_fields) < set(EngineConfig.model_fields)  # the engine's config adds, never renames


def test_an_engine_mapping_is_merged_over_the_serve_defaults_and_a_settings_object_kept_as_is():
    assert ServerConfig().engine == EngineSettings(**SERVE_ENGINE_DEFAULTS)
    merged = ServerConfig(engine={"kv_dtype": "int8"}).engine
    assert merged.kv_dtype == "int8" and merged.backend == "auto" and merged.max_queue == 256
    assert ServerConfig(engine=EngineSettings(max_queue=9)).engine == EngineSettings(max_queue=9)


def test_a_config_survives_its_dump(tmp_path):  # the workers receive cfg.model_dump()
    cfg = load_server_config(None, env={"GRINFER_HOME": str(tmp_path), "GRINFER_KV_DISK_MB": "5"}, backend="eager")
    assert ServerConfig.model_validate(cfg.model_dump()) == cfg


def test_resolved_carries_every_setting_and_refuses_what_is_still_to_decide():
    settings = load_server_config(None, env={}, kv_cache_mb=48, max_batch_tokens=4096, kv_dtype="int8").engine
    engine = settings.resolved(backend="eager", dense="none", device="cpu", disk_cache_dir="/kv")
    assert isinstance(engine, EngineConfig) and engine.disk_cache_dir == "/kv"
    assert {f: getattr(engine, f) for f in EngineSettings.model_fields} == \
        {**settings.model_dump(), "backend": "eager", "dense": "none"}
    for decided, message in (({"dense": "none"}, "backend: auto is resolved before an engine is built"),
                             ({"backend": "eager"}, "dense: unset (the checkpoint's mode) is resolved"),
                             ({"backend": "eager", "dense": "none", "kv_cache_bytes": 0},
                              "size 0 (a share of free CUDA memory) needs a CUDA device")):
        with pytest.raises(SettingError, match=re.escape(message)) as info:
            settings.resolved(**decided)
        assert "\n" not in str(info.value)
    assert settings.resolved(backend="eager", dense="none", kv_cache_bytes=0, device="cuda:0").kv_cache_bytes == 0


def test_compile_caches_live_under_grinfer_home(tmp_path):
    env = ServerConfig(home=str(tmp_path)).compile_cache_env()
    assert env == {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache" / "inductor"),
                   "TRITON_CACHE_DIR": str(tmp_path / "cache" / "triton")}


def test_the_server_builds_its_engine_from_cfg_engine_and_what_it_decides(served_checkpoint, tmp_path):
    from grinfer.serving.server import StartupError, build_server

    cfg = load_server_config(None, env={"GRINFER_HOME": str(tmp_path), "GRINFER_MAX_REALTIME": "50"},
                             store=f"sqlite:///{tmp_path / 's.db'}", backend="eager", kv_cache_mb=48, kv_host_mb=2,
                             pipeline_depth=1, max_queue=7, kv_dtype="int8")
    server = build_server(cfg, served_checkpoint, "cpu")
    try:
        engine = server.engine.production.core.config
    finally:
        server.close()
    assert {f: getattr(engine, f) for f in EngineSettings.model_fields} == {**cfg.engine.model_dump(), "dense": "none"}
    assert engine.device == "cpu" and engine.dtype == "float32"
    assert engine.disk_cache_dir.startswith(str(tmp_path / "kv"))
    zero = cfg.model_copy(update={"engine": cfg.engine.model_copy(update={"kv_cache_bytes": 0})})
    with pytest.raises(StartupError, match=r"size 0 \(a share of free CUDA memory\) needs a CUDA device"):
        build_server(zero, served_checkpoint, "cpu")


def test_the_readme_config_file_loads(tmp_path):
    readme = (Path(__file__).parents[2] / "README.md").read_text()
    f = tmp_path / "grinfer.toml"
    f.write_text(readme.split("```toml\n", 1)[1].split("```", 1)[0])
    cfg = load_server_config(str(f), env={})
    assert cfg.store == "sqlite:///grinfer.db" and cfg.engine.kv_cache_bytes == 1024 << 20
    assert cfg.engine.host_cache_bytes == 4096 << 20
