"""TLS and proxies of the `mlflow` sink: MLflow's client reads them from the environment.

MLflow's client (and `requests` under it) takes its TLS and proxy settings from the
process's environment, for every request, not from its caller, so the `mlflow` sink cannot
take the shared keys of `modelwatch.tls` and `modelwatch.proxy` per sink. The same
vocabulary is spelled as MLflow's variables, set in the daemon's environment:

| shared key | MLflow's variable |
| --- | --- |
| `ca_file` | `MLFLOW_TRACKING_SERVER_CERT_PATH` (or `REQUESTS_CA_BUNDLE`) |
| `client_cert_file`, `client_key_file` | `MLFLOW_TRACKING_CLIENT_CERT_PATH` (one PEM file, both) |
| `insecure_skip_verify` | `MLFLOW_TRACKING_INSECURE_TLS=true` |
| `proxy` | `HTTPS_PROXY` / `HTTP_PROXY`, and `NO_PROXY` (as `requests` reads them) |

`refuse_shared_keys(config)` turns a shared key in an mlflow sink's table into an error that
names the variable to set instead; `check_environment(key)` checks the files those variables
name (a `ConfigError` naming the variable) and logs `tls_verification_disabled` when
verification is off; `summary(uri)` is what `check-config` prints.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

import structlog

from modelwatch.config import SinkConfig
from modelwatch.errors import ConfigError
from modelwatch.proxy import route
from modelwatch.tls import readable_file

log = structlog.get_logger("modelwatch.sinks.mlflow")

SERVER_CERT = "MLFLOW_TRACKING_SERVER_CERT_PATH"
CLIENT_CERT = "MLFLOW_TRACKING_CLIENT_CERT_PATH"
INSECURE = "MLFLOW_TRACKING_INSECURE_TLS"
_BUNDLES = ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE")  # requests' own, used without SERVER_CERT
_INSTEAD = {
    "ca_file": f"{SERVER_CERT} (or REQUESTS_CA_BUNDLE)",
    "client_cert_file": f"{CLIENT_CERT} (one PEM file holding the certificate and its key)",
    "client_key_file": f"{CLIENT_CERT} (one PEM file holding the certificate and its key)",
    "insecure_skip_verify": f"{INSECURE}=true",
    "proxy": "HTTPS_PROXY / HTTP_PROXY (and NO_PROXY)",
    "proxy_env": "HTTPS_PROXY / HTTP_PROXY (and NO_PROXY)",
}


def refuse_shared_keys(config: SinkConfig) -> None:
    """A TLS or proxy key of the shared vocabulary is an error saying what to set instead."""
    for name in config.options:
        if name == "server_name":
            raise ConfigError(
                f"{config.key}.server_name: MLflow's client verifies the host of tracking_uri;"
                " use a tracking_uri with a name the server's certificate carries"
            )
        if name in _INSTEAD:
            raise ConfigError(
                f"{config.key}.{name}: MLflow's client reads its TLS and proxy settings from"
                f" the daemon's environment: set {_INSTEAD[name]}"
            )


def check_environment(key: str, environ: Mapping[str, str] | None = None) -> None:
    """Check the files MLflow's TLS variables name; warn when verification is off."""
    env = os.environ if environ is None else environ
    for variable in (SERVER_CERT, *_BUNDLES):
        if env.get(variable):
            readable_file(f"{key} ({variable})", env[variable])
    if env.get(CLIENT_CERT):
        readable_file(f"{key} ({CLIENT_CERT})", env[CLIENT_CERT], secret=True)
    if _insecure(env):
        log.warning(
            "tls_verification_disabled",
            key=f"{key} ({INSECURE})",
            note="any server can pretend to be MLflow's; set MLFLOW_TRACKING_SERVER_CERT_PATH",
        )


def summary(key: str, uri: str, environ: Mapping[str, str] | None = None) -> list[str]:
    """What `check-config` says about how MLflow's client reaches `uri`."""
    env = os.environ if environ is None else environ
    lines = [f"route: {_origin(uri)} via {route(key, uri, environ=env).shown}"]
    if uri.lower().startswith("https:"):
        lines.append(f"trusts: {_trust(env)}")
        client = env.get(CLIENT_CERT)
        lines.append(f"client certificate: {f'{client} ({CLIENT_CERT})' if client else 'none'}")
    return lines


def _trust(env: Mapping[str, str]) -> str:
    if _insecure(env):
        return f"nothing: certificates are not verified ({INSECURE})"
    if env.get(SERVER_CERT):
        return f"the CA certificates in {env[SERVER_CERT]} ({SERVER_CERT})"
    bundle = next((name for name in _BUNDLES if env.get(name)), None)
    if bundle is not None:
        return f"the CA certificates in {env[bundle]} ({bundle})"
    return "the CA bundle of the certifi package (requests' default, not the system store)"


def _insecure(env: Mapping[str, str]) -> bool:
    return env.get(INSECURE, "").strip().lower() in ("true", "1")


def _origin(uri: str) -> str:
    scheme, _, rest = uri.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0].rpartition('@')[2]}"
