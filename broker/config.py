"""Broker configuration: command-line flags, environment and an optional TOML file.

Example ``erllama.toml``::

    [broker]
    endpoint = "ipc:///run/user/1000/erllama/broker.sock"   # default: ipc in the runtime dir
    tcp = "tcp://127.0.0.1:7420"                              # optional extra endpoint
    log_level = "INFO"
    # name = "router1"                    # this machine's name among the hosts (default: the hostname)
    # hosts = "tcp://10.0.0.1:7421"        # where erllama-host processes join (CURVE); their workers use
    # host_workers = "tcp://10.0.0.1:7422" # this one (default: the hosts port + 1)
    # curve_hosts = "/etc/erllama/hosts"   # allowlist of host keys (default: curve_clients)

    [cachestore]                      # the broker runs erllama-cachestore with these settings
    disk_dir = "/var/cache/erllama/kv"
    ram_bytes = "1G"
    shm_bytes = "4G"
    disk_bytes = "50G"
    # shared_url = "redis://:PASSWORD@10.0.0.5:6379/0"  # a Valkey/Redis shared tier below disk
    # enabled = false                 # serve without a KV cache
    # endpoint = "ipc:///path/cs.sock" # use a store someone else runs instead of spawning one

    [pressure]                        # off by default: evict cache rows when memory runs short
    enabled = true
    source = "system"                 # system (RAM, psutil) or nvidia (VRAM, pynvml)
    high_watermark = 0.90             # start evicting at 90% used ...
    low_watermark = 0.80              # ... until about 80% is used

    [[models]]
    id = "smollm2-135m"
    # path omitted: the embedded default model
    options = { n_ctx = 4096, n_seq_max = 4 }

    [[models]]
    id = "qwen"
    path = "/models/qwen2.5-0.5b-instruct-q4_k_m.gguf"
    # host = "gpu1"                   # run its worker on the erllama-host named gpu1, once it joins
    # hosts = ["gpu1", "gpu2"]        # or one replica on each of these hosts
    # replicas = 2                    # or two replicas (on this machine: at start no host has joined)

Without a file (and without ``--no-default-model``) the broker serves the embedded default
model under the id ``smollm2-135m``.
"""

from __future__ import annotations

import logging
import os
import socket
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from erllama.broker.pressure import PressureConfig
from erllama.host.supervise import MachineSettings
from erllama.options import parse_load_options, validate_model_id
from erllama.protocol import DEFAULT_MODEL_ID, ErllamaError, ErrorCode
from erllama.transport import (
    BROKER_ENDPOINT_ENV,
    CACHESTORE_SOCKET_NAME,
    CLIENT_SOCKET_NAME,
    WORKER_SOCKET_NAME,
    check_tcp_bind,
    default_runtime_dir,
    ipc_endpoint,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class ModelSpec:
    model_id: str
    path: str | None
    options: dict[str, Any]
    places: tuple[str | None, ...] = (None,)  # one replica on each: an erllama-host's name, None for here


@dataclass(slots=True)
class CacheStoreSettings:
    """Whether workers get a KV cache, and the cache store the broker runs for them."""

    enabled: bool = True
    external_endpoint: str | None = None  # a store the broker does not spawn
    flags: list[str] = field(default_factory=list)  # passed through to erllama-cachestore
    # The shared tier's Valkey/Redis URL: handed to erllama-cachestore in its environment
    # (ERLLAMA_SHARED_URL), not its argv, so that the password stays out of process lists.
    shared_url: str | None = None


CACHESTORE_FLAGS = {  # TOML key / broker flag -> erllama-cachestore flag
    "disk_dir": "--disk-dir",
    "shm_dir": "--shm-dir",
    "ram_bytes": "--ram-bytes",
    "shm_bytes": "--shm-bytes",
    "disk_bytes": "--disk-bytes",
}


@dataclass(frozen=True, slots=True)
class CurveSettings:
    """CURVE for the tcp endpoint: the broker's key pair and the directory of allowed client keys
    (both as written by ``erllama keys``, i.e. ``zmq.auth.create_certificates``)."""

    server_key_file: Path
    clients_dir: Path
    hosts_dir: Path  # the allowlist of host keys (hosts and the workers they spawn)


@dataclass(slots=True)
class BrokerConfig:
    runtime_dir: Path
    endpoint: str
    tcp: str | None = None
    allow_remote: bool = False
    log_level: str = "INFO"
    models: list[ModelSpec] = field(default_factory=list)
    cache: CacheStoreSettings = field(default_factory=CacheStoreSettings)
    curve: CurveSettings | None = None
    pressure: PressureConfig = field(default_factory=PressureConfig)
    hosts: str | None = None  # tcp endpoint where erllama-host processes join (CURVE required)
    # This machine's name among the hosts: a model placed on it by name runs here, under the broker's own
    # supervision; no joining host may take it.
    name: str = field(default_factory=socket.gethostname)
    host_workers: str | None = None  # tcp endpoint for the workers hosts spawn (CURVE)

    @property
    def worker_endpoint(self) -> str:
        return ipc_endpoint(self.runtime_dir, WORKER_SOCKET_NAME)

    @property
    def cachestore_endpoint(self) -> str | None:
        """Where workers find the cache store (None: no cache)."""
        if not self.cache.enabled:
            return None
        return self.cache.external_endpoint or ipc_endpoint(self.runtime_dir, CACHESTORE_SOCKET_NAME)

    @property
    def machine(self) -> MachineSettings:
        """The broker's own machine, supervised as a host's is: its workers reach the broker over ipc
        (no CURVE), and its cache store is spawned unless an external one is given."""
        return MachineSettings(
            runtime_dir=self.runtime_dir,
            worker_endpoint=self.worker_endpoint,
            cachestore_endpoint=self.cachestore_endpoint,
            spawns_cachestore=self.cache.enabled and self.cache.external_endpoint is None,
            log_level=self.log_level,
            cache_flags=self.cache.flags,
            shared_url=self.cache.shared_url,
        )


def _model_spec(raw: dict[str, Any]) -> ModelSpec:
    if not isinstance(raw, dict):
        raise ErllamaError(ErrorCode.INVALID_PARAMS, "each [[models]] entry must be a table")
    model_id = validate_model_id(raw.get("id"))
    path = raw.get("path")
    if path is not None and not isinstance(path, str):
        raise ErllamaError(ErrorCode.INVALID_PARAMS, f"models.{model_id}.path must be a string")
    options = parse_load_options(raw.get("options") or {}).to_wire()
    host, hosts, replicas = raw.get("host"), raw.get("hosts"), raw.get("replicas")
    if sum(x is not None for x in (host, hosts, replicas)) > 1:
        raise ErllamaError(
            ErrorCode.INVALID_PARAMS, f"models.{model_id}: give one of host, hosts and replicas"
        )
    if host is not None:
        hosts = [host]
    if hosts is not None:
        if not isinstance(hosts, list) or not hosts or len(set(map(str, hosts))) != len(hosts):
            raise ErllamaError(ErrorCode.INVALID_PARAMS, f"models.{model_id}.hosts: a list of distinct names")
        # the same safe alphabet as model ids
        return ModelSpec(model_id, path, options, tuple(validate_model_id(h) for h in hosts))
    if replicas is not None:
        if not isinstance(replicas, int) or isinstance(replicas, bool) or not 1 <= replicas <= 64:
            raise ErllamaError(ErrorCode.INVALID_PARAMS, f"models.{model_id}.replicas: 1-64")
        return ModelSpec(model_id, path, options, (None,) * replicas)
    return ModelSpec(model_id, path, options)


def _host_workers(hosts: str, explicit: str | None) -> str:
    """The workers' endpoint: as given, else the hosts endpoint's port + 1."""
    if explicit:
        return explicit
    address, port = hosts.rsplit(":", 1)
    return f"{address}:{int(port) + 1}"


def build_config(
    config_file: str | None,
    endpoint: str | None,
    runtime_dir: str | None,
    tcp: str | None,
    allow_remote: bool,
    log_level: str | None,
    default_model: bool,
    cache_overrides: dict[str, Any] | None = None,
    curve_key: str | None = None,
    curve_clients: str | None = None,
    hosts: str | None = None,
    curve_hosts: str | None = None,
    name: str | None = None,
) -> BrokerConfig:
    """Merge flags (strongest), environment, the TOML file and defaults (weakest)."""
    file_cfg: dict[str, Any] = {}
    if config_file:
        with open(config_file, "rb") as f:
            file_cfg = tomllib.load(f)
    section = file_cfg.get("broker", {})
    rdir = Path(runtime_dir or section.get("runtime_dir") or default_runtime_dir())
    ep = (
        endpoint
        or os.environ.get(BROKER_ENDPOINT_ENV)
        or section.get("endpoint")
        or ipc_endpoint(rdir, CLIENT_SOCKET_NAME)
    )
    tcp_ep = tcp or section.get("tcp")
    allow = allow_remote or bool(section.get("allow_remote", False))
    hosts_ep = hosts or section.get("hosts")
    host_workers = _host_workers(hosts_ep, section.get("host_workers")) if hosts_ep else None
    for e in (ep, tcp_ep, hosts_ep, host_workers):
        if e:
            check_tcp_bind(e, allow)
    models = [_model_spec(m) for m in file_cfg.get("models", [])]
    if not models and default_model and not config_file:
        models = [ModelSpec(DEFAULT_MODEL_ID, None, parse_load_options({}).to_wire())]
    cache = _cache_settings(
        file_cfg.get("cachestore", {}) | {k: v for k, v in (cache_overrides or {}).items() if v is not None}
    )
    curve = None
    curve_key = curve_key or section.get("curve_secret_key")
    curve_clients = curve_clients or section.get("curve_clients")
    curve_hosts = curve_hosts or section.get("curve_hosts") or curve_clients
    if hosts_ep and not (hosts_ep.startswith("tcp://") and curve_key and curve_hosts):
        raise ErllamaError(
            ErrorCode.INVALID_PARAMS,
            "--hosts needs a tcp:// endpoint, --curve-secret-key and --curve-hosts (or --curve-clients)",
        )
    if curve_key or curve_clients:
        if not (curve_key and curve_clients and (tcp_ep or hosts_ep)):
            raise ErllamaError(
                ErrorCode.INVALID_PARAMS,
                "CURVE needs --tcp (or --hosts), --curve-secret-key and --curve-clients",
            )
        if not Path(curve_key).is_file() or not all(Path(d).is_dir() for d in (curve_clients, curve_hosts)):
            raise ErllamaError(
                ErrorCode.INVALID_PARAMS,
                f"no key file {curve_key} or no directory {curve_clients} / {curve_hosts}",
            )
        curve = CurveSettings(Path(curve_key), Path(curve_clients), Path(curve_hosts or curve_clients))
    elif tcp_ep and not tcp_ep.startswith("tcp://127.") and not tcp_ep.startswith("tcp://localhost"):
        log.warning(
            "%s is reachable from other hosts without authentication; consider --curve-secret-key", tcp_ep
        )
    ids = [m.model_id for m in models]
    if len(set(ids)) != len(ids):
        raise ErllamaError(ErrorCode.INVALID_PARAMS, "duplicate model ids in the config file")
    return BrokerConfig(
        runtime_dir=rdir,
        endpoint=ep,
        tcp=tcp_ep,
        allow_remote=allow,
        log_level=log_level or section.get("log_level", "INFO"),
        models=models,
        cache=cache,
        curve=curve,
        pressure=_pressure(file_cfg.get("pressure", {})),
        hosts=hosts_ep,
        host_workers=host_workers,
        name=validate_model_id(name or section.get("name") or socket.gethostname()),
    )


def _pressure(raw: dict[str, Any]) -> PressureConfig:
    known = {f for f in PressureConfig.__dataclass_fields__}
    unknown = set(raw) - known
    if unknown:
        raise ErllamaError(ErrorCode.INVALID_PARAMS, f"unknown [pressure] keys: {', '.join(sorted(unknown))}")
    return PressureConfig(**raw).validate()


def _cache_settings(raw: dict[str, Any]) -> CacheStoreSettings:
    unknown = set(raw) - set(CACHESTORE_FLAGS) - {"enabled", "endpoint", "shared_url"}
    if unknown:
        raise ErllamaError(
            ErrorCode.INVALID_PARAMS, f"unknown [cachestore] keys: {', '.join(sorted(unknown))}"
        )
    flags: list[str] = []
    for key, flag in CACHESTORE_FLAGS.items():
        if raw.get(key) is not None:
            flags += [flag, str(raw[key])]
    shared_url = raw.get("shared_url")
    if shared_url is not None and not isinstance(shared_url, str):
        raise ErllamaError(ErrorCode.INVALID_PARAMS, "[cachestore] shared_url must be a redis:// URL")
    return CacheStoreSettings(
        enabled=bool(raw.get("enabled", True)),
        external_endpoint=raw.get("endpoint"),
        flags=flags,
        shared_url=shared_url or None,
    )
