"""Which proxy a request takes: the environment as curl reads it, or the sink's own."""

from __future__ import annotations

import pytest

from modelwatch.errors import ConfigError
from modelwatch.proxy import bypassed, route


@pytest.mark.parametrize(
    ("no_proxy", "host", "port", "direct"),
    [
        ("*", "hooks.example.com", 443, True),
        ("example.com", "hooks.example.com", 443, True),
        (".example.com", "hooks.example.com", 443, True),
        ("example.com", "example.com", 443, True),
        ("example.com", "badexample.com", 443, False),
        ("ple.com", "example.com", 443, False),
        ("localhost,10.0.0.0/8", "10.1.2.3", 80, True),
        ("10.0.0.0/8", "11.1.2.3", 80, False),
        ("127.0.0.1", "127.0.0.1", 5000, True),
        ("example.com:8443", "hooks.example.com", 443, False),
        ("example.com:443", "hooks.example.com", 443, True),
        ("[::1]:443 internal", "::1", 443, True),
        ("::1", "::1", 443, True),
        ("fd00::/8", "fd12::1", 443, True),
        ("", "example.com", 443, False),
        (" , ,", "example.com", 443, False),
    ],
)
def test_no_proxy_entries_match_as_curl_matches_them(
    no_proxy: str, host: str, port: int, direct: bool
) -> None:
    """`*`, domain suffixes (with or without a leading dot), IP addresses, CIDR blocks and
    `:port` entries, comma- or space-separated."""
    assert bypassed(no_proxy, host, port) is direct


def test_the_lowercase_variable_wins_and_each_scheme_has_its_own() -> None:
    """https_proxy over HTTPS_PROXY for https://; HTTP_PROXY only for http://; ALL_PROXY last."""
    env = {
        "https_proxy": "http://lower:3128",
        "HTTPS_PROXY": "http://upper:3128",
        "HTTP_PROXY": "http://plain:3128",
        "ALL_PROXY": "http://all:3128",
    }
    assert route("sinks[0]", "https://h/", environ=env).shown == (
        "http://lower:3128 (from https_proxy)"
    )
    assert (
        route("sinks[0]", "http://h/", environ=env).shown == "http://plain:3128 (from HTTP_PROXY)"
    )
    assert route("sinks[0]", "http://h/", environ={"ALL_PROXY": "p:1"}).shown == (
        "http://p:1 (from ALL_PROXY)"
    )
    assert route("sinks[0]", "https://h/", environ={}).shown.startswith("direct (no https_proxy")


def test_no_proxy_applies_to_the_sinks_own_proxy_too() -> None:
    """NO_PROXY lists hosts reached directly whichever proxy was configured."""
    found = route(
        "sinks[0]", "https://db.corp/", proxy="http://p:3128", environ={"NO_PROXY": "corp"}
    )
    assert found.proxy is None
    assert found.shown == "direct (NO_PROXY covers db.corp)"


def test_proxy_credentials_become_a_header_and_are_never_shown() -> None:
    """user:password in a proxy URL (from proxy_env) is sent as Proxy-Authorization, masked."""
    env = {"CORP_PROXY": "http://alice:p%40ss@proxy.corp:8080"}
    found = route("sinks[0]", "https://h/", proxy_env="CORP_PROXY", environ=env)
    assert found.proxy is not None
    assert found.proxy.url == "http://proxy.corp:8080"
    assert found.proxy.headers == {"Proxy-Authorization": "Basic YWxpY2U6cEBzcw=="}
    assert found.shown == "http://***@proxy.corp:8080 (from proxy_env (CORP_PROXY))"
    assert "p@ss" in found.proxy.secrets


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"HTTPS_PROXY": "socks5://p:1080"}, "sinks[0] (proxy from HTTPS_PROXY): must be an http"),
        ({"HTTPS_PROXY": "http://p:3128/path"}, "sinks[0] (proxy from HTTPS_PROXY): a proxy URL"),
        ({"HTTPS_PROXY": "http://p:99999"}, "sinks[0] (proxy from HTTPS_PROXY): not a valid"),
    ],
)
def test_a_bad_proxy_variable_is_a_configuration_error_naming_it(
    env: dict[str, str], expected: str
) -> None:
    """A proxy variable modelwatch cannot use is an error naming the variable, not a silent
    direct connection."""
    with pytest.raises(ConfigError) as caught:
        route("sinks[0]", "https://h/", environ=env)
    assert str(caught.value).startswith(expected)
