"""Agent settings: the TOML file, command-line overrides, and errors that name the setting."""

from __future__ import annotations

import socket

import pytest

from nodeagent import config as config_mod
from nodeagent.config import AgentConfig, ConfigError, load


@pytest.fixture(autouse=True)
def no_default_file(tmp_path, monkeypatch):
    """Never read the machine's /etc/wicket/agent.toml."""
    monkeypatch.setattr(config_mod, "DEFAULT_PATH", str(tmp_path / "absent" / "agent.toml"))


@pytest.fixture
def write(tmp_path):
    def _write(text: str, name: str = "agent.toml") -> str:
        p = tmp_path / name
        p.write_text(text)
        return str(p)

    return _write


def test_defaults_without_a_file(monkeypatch):
    monkeypatch.setattr(socket, "gethostname", lambda: "rtr-7")
    cfg = load(None, {})
    assert cfg == AgentConfig(
        node_id="rtr-7", tag="000", state_dir="/var/lib/wicket-agent", table="wicket", backend="auto",
        link_net="169.254.0.0/16", wireguard_go="wireguard-go", blocked_size=65535, resync_interval=30.0,
        stats_interval=10.0, max_lanes=1024, log_level="INFO",
    )
    assert cfg.control_socket == "/var/lib/wicket-agent/control.sock"


def test_file_values_are_read(write):
    path = write(
        'node_id = "site-a"\ntag = "ab1"\nstate_dir = "/srv/wk"\ntable = "wk_t"\nbackend = "kernel"\n'
        'link_net = "10.20.16.0/20"\nblocked_size = 2048\nresync_interval = 5.0\nstats_interval = 2\nmax_lanes = 10\n'
    )
    cfg = load(path, {})
    assert (cfg.node_id, cfg.tag, cfg.state_dir, cfg.table, cfg.backend) == ("site-a", "ab1", "/srv/wk", "wk_t", "kernel")
    assert (cfg.link_net, cfg.blocked_size, cfg.resync_interval, cfg.stats_interval, cfg.max_lanes) == (
        "10.20.16.0/20", 2048, 5.0, 2, 10,
    )
    assert cfg.control_socket == "/srv/wk/control.sock"


def test_default_path_is_used_when_present(tmp_path, monkeypatch):
    p = tmp_path / "etc-agent.toml"
    p.write_text('node_id = "from-default"\ntag = "dd1"\n')
    monkeypatch.setattr(config_mod, "DEFAULT_PATH", str(p))
    cfg = load(None, {})
    assert (cfg.node_id, cfg.tag) == ("from-default", "dd1")


@pytest.mark.parametrize("key", ["tags", "node", "Backend", "listen_port", "state-dir"])
def test_unknown_key_named(write, key):
    path = write(f'{key} = "x"\n')
    with pytest.raises(ConfigError, match=f"unknown setting '{key}'") as exc:
        load(path, {})
    assert "known: backend, blocked_size" in str(exc.value)


def test_unknown_table_named(write):
    with pytest.raises(ConfigError, match="unknown setting 'agent'"):
        load(write('[agent]\ntag = "ab1"\n'), {})


@pytest.mark.parametrize(
    "line,pattern",
    [
        ('tag = "ab"', r"^tag 'ab': exactly 3 characters"),
        ('tag = "AB1"', r"^tag 'AB1'"),
        ('tag = "abcd"', r"^tag 'abcd'"),
        ('tag = "a;b"', r"^tag 'a;b'"),
        ('table = "Wicket"', r"^table 'Wicket'"),
        ('table = "1abc"', r"^table '1abc'"),
        ('table = "wk-t"', r"^table 'wk-t'"),
        ('table = "a b"', r"^table 'a b'"),
        ('table = "t23456789012345678901234567890123"', r"^table 't2345"),
        ('backend = "ebpf"', r"^backend 'ebpf': one of auto, userspace, kernel"),
        ('backend = ""', r"^backend ''"),
        ('link_net = "169.254.0.0/25"', r"^link_net must be /24 or larger"),
        ('link_net = "169.254.0.1/16"', r"^link_net '169.254.0.1/16': .*host bits"),
        ('link_net = "not-a-net"', r"^link_net 'not-a-net'"),
        ('link_net = "fe80::/64"', r"^link_net 'fe80::/64'"),
        ('state_dir = "var/lib/wicket"', r"^state_dir 'var/lib/wicket' must be an absolute path"),
        ('state_dir = "./state"', r"^state_dir './state'"),
        ("blocked_size = 1023", r"^blocked_size must be between 1024 and 1048576"),
        ("blocked_size = 1048577", r"^blocked_size"),
        ("blocked_size = -1", r"^blocked_size"),
        ("resync_interval = 0.5", r"resync_interval and stats_interval are seconds, at least 1"),
        ("stats_interval = 0", r"stats_interval"),
        ("stats_interval = -10", r"stats_interval"),
        ("max_lanes = 0", r"^max_lanes must be between 1 and 4096"),
        ("max_lanes = 4097", r"^max_lanes"),
        ('node_id = "-rtr"', r"^node_id '-rtr'"),
        ('node_id = "rtr 1"', r"^node_id 'rtr 1'"),
        ('node_id = "rtr;reboot"', r"^node_id 'rtr;reboot'"),
    ],
)
def test_bad_values_name_the_setting(write, line, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load(write(line + "\n"), {})


@pytest.mark.parametrize(
    "key,value",
    [("blocked_size", 1024), ("blocked_size", 1 << 20), ("max_lanes", 1), ("max_lanes", 4096), ("resync_interval", 1),
     ("stats_interval", 1), ("link_net", "10.0.0.0/24")],
)
def test_boundary_values_accepted(write, key, value):
    rendered = f'"{value}"' if isinstance(value, str) else str(value)
    cfg = load(write(f"{key} = {rendered}\n"), {})
    assert getattr(cfg, key) == value


def test_overrides_beat_the_file(write):
    path = write('tag = "ab1"\nstate_dir = "/srv/a"\nbackend = "kernel"\nnode_id = "file-node"\n')
    cfg = load(path, {"tag": "cd2", "state_dir": "/srv/b", "backend": None, "node_id": "cli-node", "log_level": None})
    assert (cfg.tag, cfg.state_dir, cfg.node_id) == ("cd2", "/srv/b", "cli-node")
    assert cfg.backend == "kernel"  # None means "not given": the file's value stays
    assert cfg.log_level == "INFO"


def test_overrides_are_validated_too(write):
    with pytest.raises(ConfigError, match="^tag 'X'"):
        load(write('tag = "ab1"\n'), {"tag": "X"})
    with pytest.raises(ConfigError, match="state_dir 'rel' must be an absolute path"):
        load(None, {"state_dir": "rel"})


def test_unknown_override_is_an_error():
    with pytest.raises(ConfigError, match="bogus"):
        load(None, {"bogus": 1})


def test_missing_file_named_explicitly(tmp_path):
    missing = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match=f"config file {missing} does not exist"):
        load(str(missing), {})


def test_malformed_toml_names_the_file(write):
    path = write('tag = "ab1\n')
    with pytest.raises(ConfigError, match=f"^{path}: "):
        load(path, {})


def test_malformed_default_file_is_a_config_error(tmp_path, monkeypatch):
    p = tmp_path / "agent.toml"
    p.write_text('tag = "ab1\n')
    monkeypatch.setattr(config_mod, "DEFAULT_PATH", str(p))
    with pytest.raises(ConfigError, match=str(p)):
        load(None, {})


@pytest.mark.parametrize(
    "line,setting",
    [
        ('blocked_size = "big"', "blocked_size"),
        ("tag = 123", "tag"),
        ("state_dir = 5", "state_dir"),
        ('resync_interval = "30"', "resync_interval"),
        ("node_id = 7", "node_id"),
        ("max_lanes = 1.5", "max_lanes"),
    ],
)
def test_wrong_types_are_config_errors_naming_the_setting(write, line, setting):
    with pytest.raises(ConfigError, match=setting):
        load(write(line + "\n"), {})


@pytest.mark.parametrize(
    "hostname,expected",
    [
        ("rtr-7", "rtr-7"),
        ("rtr 7", "rtr-7"),
        ("rtr_7.site.example", "rtr_7.site.example"),
        ("r\u00f6uter;$(x)", "r-uter---x-"),
        ("h" * 80, "h" * 64),
        ("", "node"),
    ],
)
def test_node_id_defaults_from_hostname_sanitised(monkeypatch, hostname, expected):
    monkeypatch.setattr(socket, "gethostname", lambda: hostname)
    assert load(None, {}).node_id == expected


def test_explicit_node_id_wins_over_hostname(monkeypatch, write):
    monkeypatch.setattr(socket, "gethostname", lambda: "hostname-node")
    assert load(write('node_id = "file-node"\n'), {}).node_id == "file-node"
    assert load(None, {"node_id": "cli-node"}).node_id == "cli-node"


def test_validate_on_dataclass_directly():
    with pytest.raises(ConfigError, match="^backend 'x'"):
        AgentConfig(node_id="n", backend="x").validate()
    assert AgentConfig(node_id="n", tag="abc").validate().tag == "abc"
