"""User errors on the real command line: one `error:` line naming the setting and what it accepts, exit 2."""

import pytest
from subprocess_util import grinfer, one_error_line


@pytest.mark.parametrize("args, env, expected", [
    (["serve", "--store", "bogus://x"], {}, "--store bogus://x: unsupported store URL bogus://; use sqlite://"),
    (["serve", "--cache", "memcached://x"], {}, "--cache memcached://x: unsupported cache URL"),
    (["serve"], {"GRINFER_PORT": "abc"}, "GRINFER_PORT=abc: input should be a valid integer"),
    (["serve"], {"GRINFER_MAX_QUEUE": "0"}, "GRINFER_MAX_QUEUE=0: input should be greater than or equal to 1"),
    (["serve", "--backend", "fast"], {},
     "backend accepts one of 'auto', 'eager', 'compiled', 'fused', 'aoti', 'onnx', 'baseline'"),
    (["serve", "--port", "abc"], {}, "Invalid value for '--port'"),
    (["serve", "--pipeline-depth", "3"], {}, "--pipeline-depth 3: input should be less than or equal to 2"),
    (["serve"], {"GRINFER_KV_CACHE_MB": "-5"}, "GRINFER_KV_CACHE_MB=-5: input should be greater than or equal to 0"),
    (["serve", "--model", "/no/such/model", "--port", "0", "--grpc-port", "0"], {}, "holds no checkpoint"),
    (["train", "--out", "x", "--preset", "mtgr-tiny", "--set", "d_model=abc"], {},
     "--set d_model=abc: input should be a valid integer"),
    (["train", "--out", "x", "--set", "dmodel=64"], {}, "--set dmodel=64: unknown setting 'dmodel'; known settings:"),
    (["train", "--out", "x", "--set", "d_model"], {}, "--set expects key=value"),
])
def test_a_user_error_is_one_line_and_exit_2(args, env, expected):
    assert expected in one_error_line(grinfer(*args, env=env))


def test_an_unknown_toml_key_names_the_file_and_the_known_keys(tmp_path):
    config = tmp_path / "grinfer.toml"
    config.write_text("[server]\nprot = 9000\n")
    line = one_error_line(grinfer("serve", "--config", str(config)))
    assert f"{config}: key 'prot': unknown setting 'prot'; known settings: home, host, port" in line


def test_an_engine_key_in_the_server_table_names_the_engine_table(tmp_path):
    config = tmp_path / "grinfer.toml"
    config.write_text("[server]\nkv_cache_mb = 512\n")
    line = one_error_line(grinfer("serve", "--config", str(config)))
    assert f"{config}: key 'kv_cache_mb' is an engine setting; it belongs in the [engine] table" in line
