"""Server configuration: defaults < TOML file < GRINFER_* environment < flags; errors are one line naming
where the value came from; every default path lives under GRINFER_HOME."""

from pathlib import Path

import pytest

from grinfer.config import ServerConfig, SettingError, dataset_key, load_server_config, settings_help


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
    assert cfg.backend == "compiled" and cfg.port == 8000


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
])
def test_bad_values_are_one_line_naming_the_setting(env, flags, message):
    with pytest.raises(SettingError) as info:
        load_server_config(None, env=env, **flags)
    text = str(info.value)
    assert message in text and "\n" not in text and "pydantic" not in text


def test_unknown_file_key_is_rejected(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("prot = 1\n")
    with pytest.raises(SettingError, match=r"bad.toml: key 'prot': unknown setting 'prot'; known settings: home, host"):
        load_server_config(str(f), env={})


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
    cfg = ServerConfig(home=str(tmp_path), store="postgresql://me:secret@db/grinfer", backend="compiled")
    line = cfg.describe("cuda:0", {"ranking": tmp_path / "r", "retrieval": None})
    for part in ("store postgresql://me:***@db/grinfer", "cache memory://", f"ranking {tmp_path / 'r'}",
                 "retrieval none", "device cuda:0", "backend compiled", f"home {tmp_path}"):
        assert part in line
    assert "secret" not in line


def test_settings_help_lists_every_setting_with_its_variable():
    text = settings_help()
    for name in ServerConfig.model_fields:
        assert f"GRINFER_{name.upper()}=" in text


def test_compile_caches_live_under_grinfer_home(tmp_path):
    env = ServerConfig(home=str(tmp_path)).compile_cache_env()
    assert env == {"TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache" / "inductor"),
                   "TRITON_CACHE_DIR": str(tmp_path / "cache" / "triton")}
