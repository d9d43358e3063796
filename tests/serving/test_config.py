"""Server configuration: defaults < TOML file < GRINFER_* environment < flags; errors name the field."""

import pytest
from pydantic import ValidationError

from grinfer.config import ServerConfig, load_server_config


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


@pytest.mark.parametrize("env, field", [({"GRINFER_PORT": "70000"}, "port"),
                                        ({"GRINFER_BACKEND": "fast"}, "backend"),
                                        ({"GRINFER_MAX_QUEUE": "zero"}, "max_queue")])
def test_bad_values_name_the_field(env, field):
    with pytest.raises(ValidationError, match=field):
        load_server_config(None, env=env)


def test_unknown_file_key_is_rejected(tmp_path):
    f = tmp_path / "bad.toml"
    f.write_text("prot = 1\n")
    with pytest.raises(ValidationError, match="prot"):
        load_server_config(str(f), env={})
