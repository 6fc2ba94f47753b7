"""The config file's rules, one table row each: a YAML snippet and what it loads to, or the exact
error (key path and reason). No TensorFlow, no processes: the whole file runs in well under 5 s."""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from modelmux_common.config import (
    ConfigError,
    GatewayConfig,
    ModelsyncConfig,
    load,
    parse_duration,
    parse_size,
)
from modelmux_common.config.fields import (
    DURATION,
    INTEGER,
    MORE_THAN_ZERO,
    POSITIVE,
    STRING,
    Context,
    read,
    rule,
    section,
    setting,
)

ROOT = Path(__file__).resolve().parents[2]
KNOWN_GATEWAY = ", ".join(sorted(GatewayConfig.__dataclass_fields__))
KNOWN_MODELSYNC = ", ".join(sorted(ModelsyncConfig.__dataclass_fields__))
NAME_RULE = "is not a valid name (letters, digits, '_', '.', '-')"
TF = "handler: {models: {path: m}}"  # the smallest valid tensorflow handler
PY = "type: python, path: h.py"  # a python handler's file (written by the fixture)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    (tmp_path / "h.py").write_text("class Handler:\n    pass\n")
    (tmp_path / "s.proto").write_text('syntax = "proto3";\n')
    (tmp_path / "h.txt").write_text("")
    return tmp_path


def load_text(folder: Path, text: str, **kwargs: Any) -> Any:
    file = folder / "modelmux.yaml"
    file.write_text(text)
    return load(file, **kwargs)


def error_of(folder: Path, text: str, **kwargs: Any) -> str:
    """``key: reason`` of the error loading ``text`` (the file's name checked and cut)."""
    with pytest.raises(ConfigError) as info:
        load_text(folder, text, **kwargs)
    file = str(folder / "modelmux.yaml")
    assert info.value.file == file and str(info.value).startswith(f"{file}: ")
    return f"{info.value.key}: {info.value.reason}"


def pick(value: Any, path: str) -> Any:
    """``value``'s part at ``path``: attributes, ``[i]`` indexes and ``{key}`` mapping keys."""
    for part in re.findall(r"\.?([A-Za-z_]\w*)|\[(\d+)\]|\{([^}]*)\}", path):
        attr, index, key = part
        value = getattr(value, attr) if attr else value[int(index)] if index else value[key]
    return value


# --- values: (YAML, {path in the loaded Config: value}); "{dir}" is the config file's folder ------

VALUES: list[tuple[str, dict[str, Any]]] = [
    # defaults, and an empty file or sections
    ("", {"gateway": GatewayConfig(), "modelsync.listen": "127.0.0.1:8510", "apis": ()}),
    ("gateway:\nmodelsync:\napis:\nbackends:", {"gateway.workers": 1, "backends": ()}),
    (
        "gateway: {}",
        {"gateway.max_message_bytes": 64 * 1024 * 1024, "gateway.backend_timeout": 30.0},
    ),
    # strings take numbers too
    ("gateway: {listen: 'unix:/tmp/g.sock', admin_token: 1234}", {"gateway.admin_token": "1234"}),
    # integers: plain, quoted (the environment gives strings), floats cut
    ("gateway: {workers: 3}", {"gateway.workers": 3}),
    ("gateway: {workers: '3'}", {"gateway.workers": 3}),
    ("gateway: {max_inflight: 2.7}", {"gateway.max_inflight": 2}),
    # booleans: YAML's and the words the environment uses
    ("gateway: {reuse_freed_memory: false}", {"gateway.reuse_freed_memory": False}),
    ("gateway: {reuse_freed_memory: 'off', log_requests: 'yes'}", {"gateway.log_requests": True}),
    ("gateway: {manage_backends: '0'}", {"gateway.manage_backends": False}),
    ("gateway: {manage_backends: 'TRUE'}", {"gateway.manage_backends": True}),
    # durations: seconds, ms, s, m, h; zero where it means "none"
    ("gateway: {backend_timeout: 500ms}", {"gateway.backend_timeout": 0.5}),
    ("gateway: {backend_timeout: 2.5}", {"gateway.backend_timeout": 2.5}),
    ("gateway: {load_timeout: 5m, dns_refresh: ' 3 s '}", {"gateway.load_timeout": 300.0}),
    ("gateway: {handler_start_timeout: 1h}", {"gateway.handler_start_timeout": 3600.0}),
    ("gateway: {shutdown_grace: 0}", {"gateway.shutdown_grace": 0.0}),
    ("modelsync: {removal_grace: 0s, settle: 0, debounce: 0ms}", {"modelsync.debounce": 0.0}),
    # sizes: bytes, powers of 1000 and of 1024
    ("gateway: {max_message_bytes: 1000}", {"gateway.max_message_bytes": 1000}),
    ("gateway: {max_message_bytes: 4MiB}", {"gateway.max_message_bytes": 4 * 1024 * 1024}),
    ("modelsync: {max_bytes_in_flight: 2GB}", {"modelsync.max_bytes_in_flight": 2 * 10**9}),
    ("modelsync: {max_bytes_in_flight: '1.5 KiB'}", {"modelsync.max_bytes_in_flight": 1536}),
    # log levels, any case
    (
        "gateway: {log_level: DEBUG}\nmodelsync: {log_level: warning}",
        {"gateway.log_level": "DEBUG"},
    ),
    # folders relative to the config file; empty stays empty
    ("gateway: {runtime_dir: run}", {"gateway.runtime_dir": "{dir}/run"}),
    ("gateway: {runtime_dir: ''}", {"gateway.runtime_dir": ""}),
    ("modelsync: {target: /abs/vol}", {"modelsync.target": "/abs/vol"}),
    ("modelsync: {target: ../vol}", {"modelsync.target": "{parent}/vol"}),
    # backends: names default to backend-N, accelerators
    (
        "backends: [{address: 'a:1'}, {name: x, address: 'unix:/b', accelerator: gpu}]",
        {
            "backends[0].name": "backend-0",
            "backends[1].name": "x",
            "backends[1].accelerator": "gpu",
        },
    ),
    ("backends: [{address: 'dns:///pods:8500'}]", {"backends[0].address": "dns:///pods:8500"}),
    ("backends: [{address: 'dns:pods:8500'}]", {"backends[0].accelerator": "cpu"}),
    # version labels
    ("version_labels: {m: {stable: 1, canary: 0}}", {"version_labels{m}{canary}": 0}),
    ("version_labels: {m: null}", {"version_labels{m}": {}}),
    # an API: defaults, paths resolved, S3 URIs end with "/"
    (
        f"apis: [{{name: a, {TF}}}]",
        {
            "apis[0].kind": "RealtimeAPI",
            "apis[0].handler_type": "tensorflow",
            "apis[0].handler_path": "",
            "apis[0].sources[0].name": "a",
            "apis[0].sources[0].kind": "path",
            "apis[0].sources[0].uri": "{dir}/m",
            "apis[0].sources[0].savedmodel": True,
            "apis[0].processes_per_replica": 1,
            "apis[0].max_batch_size": 0,
            "apis[0].compute": {},
            "apis[0].handler_config": {},
        },
    ),
    (
        "apis: [{name: a, handler: {models: {path: 's3://b/p'}}}]",
        {"apis[0].sources[0].uri": "s3://b/p/"},
    ),
    (
        "apis: [{name: a, handler: {models: {dir: d, signature_key: s}}}]",
        {
            "apis[0].sources[0].kind": "dir",
            "apis[0].sources[0].name": "",
            "apis[0].signature_key": "s",
        },
    ),
    (
        "apis: [{name: a, handler: {models: {paths: [{name: x, path: p}, {name: y, path: 's3://b'}]}}}]",
        {"apis[0].sources[0].name": "x", "apis[0].sources[1].uri": "s3://b/"},
    ),
    (
        "apis: [{name: a, kind: AsyncAPI, compute: {inf: 1, cpu: '2', mem: 4G}, " + TF + "}]",
        {
            "apis[0].kind": "AsyncAPI",
            "apis[0].inferentia": True,
            "apis[0].sources[0].inferentia": True,
            "apis[0].compute": {"inf": 1, "cpu": "2", "mem": "4G"},
        },
    ),
    ("apis: [{name: a, compute: {gpu: 1, inf: 0}, " + TF + "}]", {"apis[0].inferentia": False}),
    (
        "apis: [{name: a, handler: {path: h.py, protobuf_path: s.proto, config: {k: [1]}, "
        "models: {path: m}, processes_per_replica: 2, threads_per_process: 3}}]",
        {
            "apis[0].handler_path": "{dir}/h.py",
            "apis[0].protobuf_path": "{dir}/s.proto",
            "apis[0].handler_config": {"k": [1]},
            "apis[0].threads_per_process": 3,
        },
    ),
    (
        "apis: [{name: a, handler: {models: {path: m}, server_side_batching: {max_batch_size: 8}}}]",
        {"apis[0].max_batch_size": 8, "apis[0].batch_interval": 0.0},
    ),
    (
        "apis: [{name: a, handler: {models: {path: m}, "
        "server_side_batching: {max_batch_size: 2, batch_interval: 3ms}}}]",
        {"apis[0].batch_interval": 0.003},
    ),
    # python handlers: their models, caches
    (
        f"apis: [{{name: p, handler: {{{PY}}}}}]",
        {"apis[0].handler_type": "python", "apis[0].sources": (), "apis[0].cache_size": 0},
    ),
    (
        f"apis: [{{name: p, handler: {{{PY}, multi_model_reloading: "
        "{dir: d, cache_size: 1, disk_cache_size: 3}}}]",
        {
            "apis[0].sources[0].savedmodel": False,
            "apis[0].cache_size": 1,
            "apis[0].disk_cache_size": 3,
        },
    ),
    # one model in two APIs' dir sources is not checked here (the folders' children are not read)
    (
        "apis: [{name: a, handler: {models: {dir: d}}}, {name: b, handler: {models: {dir: d}}}]",
        {"apis[1].name": "b"},
    ),
]


@pytest.mark.parametrize(("text", "expected"), VALUES, ids=[row[0][:60] for row in VALUES])
def test_values(folder: Path, text: str, expected: dict[str, Any]) -> None:
    config = load_text(folder, text)
    for path, value in expected.items():
        if isinstance(value, str):
            value = value.replace("{dir}", str(folder)).replace("{parent}", str(folder.parent))
        assert pick(config, path) == value, path


# --- errors: (YAML, "key: reason") -----------------------------------------------------------

ERRORS: list[tuple[str, str]] = [
    # the file's shape
    ("[1, 2]", "<file>: expected a mapping, got list"),
    ("gateway: {a: [}", "<file>: not valid YAML"),
    (
        "gatway: {}",
        "gatway: unknown key (known: apis, backends, gateway, modelsync, version_labels)",
    ),
    ("gateway: [1]", "gateway: expected a mapping, got list"),
    ("gateway: {listne: x}", f"gateway.listne: unknown key (known: {KNOWN_GATEWAY})"),
    ("modelsync: {x: 1}", f"modelsync.x: unknown key (known: {KNOWN_MODELSYNC})"),
    # strings
    ("gateway: {listen: null}", "gateway.listen: expected a string, got NoneType"),
    ("gateway: {modelsync: [a]}", "gateway.modelsync: expected a string, got list"),
    ("gateway: {admin_token: true}", "gateway.admin_token: expected a string, got bool"),
    # integers and their ranges
    ("gateway: {workers: 0}", "gateway.workers: must be positive"),
    ("gateway: {workers: -2}", "gateway.workers: must be positive"),
    ("gateway: {workers: true}", "gateway.workers: expected an integer"),
    ("gateway: {workers: many}", "gateway.workers: invalid literal for int() with base 10: 'many'"),
    ("gateway: {max_inflight: 0}", "gateway.max_inflight: must be positive"),
    ("gateway: {backend_max_inflight: 0}", "gateway.backend_max_inflight: must be positive"),
    ("modelsync: {download_concurrency: 0}", "modelsync.download_concurrency: must be positive"),
    ("modelsync: {s3_max_attempts: 0}", "modelsync.s3_max_attempts: must be positive"),
    ("modelsync: {download_attempts: 0}", "modelsync.download_attempts: must be positive"),
    ("modelsync: {event_log_size: 0}", "modelsync.event_log_size: must be positive"),
    # sizes
    ("gateway: {max_message_bytes: 0}", "gateway.max_message_bytes: must be positive"),
    ("gateway: {max_message_bytes: 0MiB}", "gateway.max_message_bytes: must be positive"),
    (
        "gateway: {max_message_bytes: 4 MB/s}",
        "gateway.max_message_bytes: '4 MB/s' is not a size such as 1048576, 512KiB or 64MiB",
    ),
    (
        "modelsync: {max_bytes_in_flight: false}",
        "modelsync.max_bytes_in_flight: expected a size in bytes such as 1048576 or 64MiB",
    ),
    # booleans
    ("gateway: {log_requests: maybe}", "gateway.log_requests: expected true or false, got 'maybe'"),
    (
        "gateway: {reuse_freed_memory: 2}",
        "gateway.reuse_freed_memory: expected true or false, got 2",
    ),
    # durations and their ranges
    (
        "gateway: {backend_timeout: soon}",
        "gateway.backend_timeout: 'soon' is not a duration such as 10s or 500ms",
    ),
    (
        "gateway: {backend_timeout: 5d}",
        "gateway.backend_timeout: '5d' is not a duration such as 10s or 500ms",
    ),
    (
        "gateway: {backend_timeout: true}",
        "gateway.backend_timeout: expected a duration such as 10s or 500ms",
    ),
    ("gateway: {backend_timeout: -1}", "gateway.backend_timeout: a duration cannot be negative"),
    (
        "gateway: {shutdown_grace: -1s}",
        "gateway.shutdown_grace: '-1s' is not a duration such as 10s or 500ms",
    ),
    ("gateway: {status_interval: 0s}", "gateway.status_interval: must be more than zero"),
    ("gateway: {backend_timeout: 0}", "gateway.backend_timeout: must be more than zero"),
    ("gateway: {dns_refresh: 0}", "gateway.dns_refresh: must be more than zero"),
    ("gateway: {load_timeout: 0ms}", "gateway.load_timeout: must be more than zero"),
    ("gateway: {handler_timeout: 0}", "gateway.handler_timeout: must be more than zero"),
    (
        "gateway: {handler_start_timeout: 0}",
        "gateway.handler_start_timeout: must be more than zero",
    ),
    ("modelsync: {poll_interval: 0}", "modelsync.poll_interval: must be more than zero"),
    ("modelsync: {stall_timeout: 0}", "modelsync.stall_timeout: must be more than zero"),
    ("modelsync: {progress_interval: 0}", "modelsync.progress_interval: must be more than zero"),
    # log levels
    (
        "gateway: {log_level: loud}",
        "gateway.log_level: 'loud' is not a log level (critical, debug, error, fatal, info, notset, warn, warning)",
    ),
    # backends
    ("backends: {a: 1}", "backends: expected a list"),
    ("backends: [3]", "backends[0]: expected a mapping, got int"),
    (
        "backends: [{name: a}]",
        "backends[0].address: required: host:port, dns:///name:port or unix:path",
    ),
    (
        "backends: [{address: ''}]",
        "backends[0].address: required: host:port, dns:///name:port or unix:path",
    ),
    (
        "backends: [{address: 'dns:///pods'}]",
        "backends[0].address: 'dns:///pods' is not dns:///name:port",
    ),
    (
        "backends: [{address: 'a:1', accelerator: tpu}]",
        "backends[0].accelerator: 'tpu' is not cpu, gpu or inferentia",
    ),
    ("backends: [{address: 'a:1', name: ''}]", f"backends[0].name: '' {NAME_RULE}"),
    (
        "backends: [{address: 'a:1', port: 1}]",
        "backends[0].port: unknown key (known: accelerator, address, metrics_listen, name, tls)",
    ),
    (
        "backends: [{address: 'a:1'}, {address: 'b:1', name: backend-0}]",
        "backends: duplicate backend name 'backend-0'",
    ),
    # version labels
    ("version_labels: [1]", "version_labels: expected a mapping, got list"),
    ("version_labels: {'a b': {x: 1}}", f"version_labels.a b: 'a b' {NAME_RULE}"),
    ('version_labels: {m: {"x\\n": 1}}', f"version_labels.m.x\n: 'x\\n' {NAME_RULE}"),
    (
        "version_labels: {m: {stable: -1}}",
        "version_labels.m.stable: a label points at an integer version",
    ),
    (
        "version_labels: {m: {stable: v1}}",
        "version_labels.m.stable: a label points at an integer version",
    ),
    (
        "version_labels: {m: {stable: true}}",
        "version_labels.m.stable: a label points at an integer version",
    ),
    ("version_labels: {m: 1}", "version_labels.m: expected a mapping, got int"),
    # an API's name and kind
    ("apis: {}", "apis: expected a list"),
    ("apis: [1]", "apis[0]: expected a mapping, got int"),
    (f"apis: [{{{TF}}}]", "apis[0].name: required: a name (letters, digits, '_', '.', '-')"),
    (f"apis: [{{name: 'a b', {TF}}}]", f"apis[0].name: 'a b' {NAME_RULE}"),
    ("apis: [{name: " + "x" * 129 + ", " + TF + "}]", f"apis[0].name: '{'x' * 129}' {NAME_RULE}"),
    (
        f"apis: [{{name: a, kind: Job, {TF}}}]",
        "apis[0].kind: 'Job' is not RealtimeAPI, AsyncAPI or BatchAPI",
    ),
    (
        f"apis: [{{name: a, extra: 1, {TF}}}]",
        "apis[0].extra: unknown key (known: async, batch, compute, handler, kind, name)",
    ),
    (
        f"apis: [{{name: a, {TF}}}, {{name: a, handler: {{models: {{path: n}}}}}}]",
        "apis: duplicate API name 'a'",
    ),
    (
        f"apis: [{{name: a, {TF}}}, {{name: b, handler: {{models: {{paths: [{{name: a, path: x}}]}}}}}}]",
        "apis: model 'a' is defined by both 'a' and 'b'",
    ),
    # compute
    (
        f"apis: [{{name: a, compute: {{tpu: 1}}, {TF}}}]",
        "apis[0].compute.tpu: unknown key (known: cpu, gpu, inf, mem)",
    ),
    (
        f"apis: [{{name: a, compute: {{gpu: 1, inf: 1}}, {TF}}}]",
        "apis[0].compute: an API runs on either gpu or inf, not both",
    ),
    (
        f"apis: [{{name: a, compute: {{cpu: [1]}}, {TF}}}]",
        "apis[0].compute.cpu: expected a number or a string, got list",
    ),
    # the handler's type and models
    (
        "apis: [{name: a, handler: {type: java}}]",
        "apis[0].handler.type: 'java' is not tensorflow or python",
    ),
    (
        "apis: [{name: a}]",
        "apis[0].handler.models: a tensorflow handler needs one of path, paths, dir",
    ),
    (
        "apis: [{name: a, handler: {type: tensorflow}}]",
        "apis[0].handler.models: a tensorflow handler needs one of path, paths, dir",
    ),
    (
        "apis: [{name: a, handler: {models: null}}]",
        "apis[0].handler.models: a tensorflow handler needs one of path, paths, dir",
    ),
    (
        "apis: [{name: a, handler: {models: {path: x, dir: y}}}]",
        "apis[0].handler.models: give exactly one of path, paths, dir (got path, dir)",
    ),
    (
        "apis: [{name: a, handler: {models: {path: m}, multi_model_reloading: {path: m}}}]",
        "apis[0].handler.multi_model_reloading: not valid for a tensorflow handler (use models)",
    ),
    (
        f"apis: [{{name: a, handler: {{{PY}, models: {{path: m}}}}}}]",
        "apis[0].handler.models: not valid for a python handler (use multi_model_reloading)",
    ),
    (
        "apis: [{name: a, handler: {models: {path: m, size: 1}}}]",
        "apis[0].handler.models.size: unknown key (known: cache_size, dir, disk_cache_size, path, paths, signature_key)",
    ),
    # model URIs
    (
        "apis: [{name: a, handler: {models: {path: null}}}]",
        "apis[0].handler.models.path: expected an s3:// URI or a folder path",
    ),
    (
        "apis: [{name: a, handler: {models: {path: ' '}}}]",
        "apis[0].handler.models.path: expected an s3:// URI or a folder path",
    ),
    (
        "apis: [{name: a, handler: {models: {path: 'http://x'}}}]",
        "apis[0].handler.models.path: 'http://x': only s3:// URIs and local folders are supported",
    ),
    (
        "apis: [{name: a, handler: {models: {dir: 's3:///p'}}}]",
        "apis[0].handler.models.dir: 's3:///p' has no bucket",
    ),
    # paths
    (
        "apis: [{name: a, handler: {models: {paths: []}}}]",
        "apis[0].handler.models.paths: expected a non-empty list of {name, path}",
    ),
    (
        "apis: [{name: a, handler: {models: {paths: x}}}]",
        "apis[0].handler.models.paths: expected a non-empty list of {name, path}",
    ),
    (
        "apis: [{name: a, handler: {models: {paths: [x]}}}]",
        "apis[0].handler.models.paths[0]: expected a mapping, got str",
    ),
    (
        "apis: [{name: a, handler: {models: {paths: [{path: x}]}}}]",
        "apis[0].handler.models.paths[0].name: required: a name (letters, digits, '_', '.', '-')",
    ),
    (
        "apis: [{name: a, handler: {models: {paths: [{name: x}]}}}]",
        "apis[0].handler.models.paths[0].path: required: an s3:// URI or a folder path",
    ),
    (
        "apis: [{name: a, handler: {models: {paths: [{name: x, path: p}, {name: x, path: q}]}}}]",
        "apis[0].handler.models.paths[1].name: duplicate model name 'x'",
    ),
    # handler files
    (
        "apis: [{name: a, handler: {type: python}}]",
        "apis[0].handler.path: a python handler needs the path of its .py file",
    ),
    (
        "apis: [{name: a, handler: {path: h.txt, models: {path: m}}}]",
        "apis[0].handler.path: 'h.txt' is not a .py file",
    ),
    (
        "apis: [{name: a, handler: {path: nope.py, models: {path: m}}}]",
        "apis[0].handler.path: {dir}/nope.py does not exist",
    ),
    (
        "apis: [{name: a, handler: {path: 3, models: {path: m}}}]",
        "apis[0].handler.path: expected a file path",
    ),
    (
        "apis: [{name: a, handler: {path: h.py, protobuf_path: nope.proto, models: {path: m}}}]",
        "apis[0].handler.protobuf_path: {dir}/nope.proto does not exist",
    ),
    (
        "apis: [{name: a, handler: {path: h.py, protobuf_path: h.py, models: {path: m}}}]",
        "apis[0].handler.protobuf_path: 'h.py' is not a .proto file",
    ),
    (
        "apis: [{name: a, handler: {protobuf_path: s.proto, models: {path: m}}}]",
        "apis[0].handler.protobuf_path: a service needs a handler (set handler.path)",
    ),
    (
        "apis: [{name: a, handler: {config: [1], models: {path: m}}}]",
        "apis[0].handler.config: expected a mapping",
    ),
    # worker counts
    (
        f"apis: [{{name: a, handler: {{{PY}, threads_per_process: 0}}}}]",
        "apis[0].handler.threads_per_process: must be positive",
    ),
    (
        f"apis: [{{name: a, handler: {{{PY}, processes_per_replica: 0}}}}]",
        "apis[0].handler.processes_per_replica: must be positive",
    ),
    # model caches
    (
        f"apis: [{{name: a, handler: {{{PY}, multi_model_reloading: {{path: m, cache_size: 2}}}}}}]",
        "apis[0].handler.multi_model_reloading: set both cache_size and disk_cache_size, or neither",
    ),
    (
        "apis: [{name: a, handler: {models: {path: x, cache_size: 2}}}]",
        "apis[0].handler.models: set both cache_size and disk_cache_size, or neither",
    ),
    (
        f"apis: [{{name: a, handler: {{{PY}, multi_model_reloading: {{path: m, cache_size: 0, disk_cache_size: 1}}}}}}]",
        "apis[0].handler.multi_model_reloading.cache_size: must be positive",
    ),
    (
        f"apis: [{{name: a, handler: {{{PY}, multi_model_reloading: {{path: m, cache_size: 3, disk_cache_size: 2}}}}}}]",
        "apis[0].handler.multi_model_reloading.cache_size: cache_size (3) must not exceed disk_cache_size (2)",
    ),
    (
        f"apis: [{{name: a, handler: {{{PY}, processes_per_replica: 2, "
        "multi_model_reloading: {path: m, cache_size: 1, disk_cache_size: 1}}}]",
        "apis[0].handler.multi_model_reloading.cache_size: model caching needs processes_per_replica: 1 "
        "(each process would hold its own cache, so the limits would not hold for the replica)",
    ),
    (
        "apis: [{name: a, handler: {models: {path: m, cache_size: 1, disk_cache_size: 1}}}]",
        "apis[0].handler.models.cache_size: model caching is for python handlers; the backends keep "
        "every version of a tensorflow handler's models loaded",
    ),
    # server-side batching
    (
        "apis: [{name: a, handler: {models: {path: m}, server_side_batching: {}}}]",
        "apis[0].handler.server_side_batching: give max_batch_size (and optionally batch_interval)",
    ),
    (
        "apis: [{name: a, handler: {models: {path: m}, server_side_batching: null}}]",
        "apis[0].handler.server_side_batching: give max_batch_size (and optionally batch_interval)",
    ),
    (
        "apis: [{name: a, handler: {models: {path: m}, server_side_batching: {batch_interval: 5ms}}}]",
        "apis[0].handler.server_side_batching.max_batch_size: required when batching is configured",
    ),
    (
        "apis: [{name: a, handler: {models: {path: m}, server_side_batching: {max_batch_size: 1}}}]",
        "apis[0].handler.server_side_batching.max_batch_size: must be at least 2 (1 never batches)",
    ),
    (
        "apis: [{name: a, handler: {models: {path: m}, server_side_batching: {max_batch_size: 4, size: 3}}}]",
        "apis[0].handler.server_side_batching.size: unknown key (known: batch_interval, max_batch_size)",
    ),
    (
        "apis: [{name: a, handler: {models: {path: m}, server_side_batching: {max_batch_size: 4, batch_interval: -1}}}]",
        "apis[0].handler.server_side_batching.batch_interval: a duration cannot be negative",
    ),
    (
        f"apis: [{{name: a, handler: {{{PY}, server_side_batching: {{max_batch_size: 4}}}}}}]",
        "apis[0].handler.server_side_batching: batching joins calls to the backends; a python "
        "handler's models never go to them",
    ),
    # a BatchAPI's batch section
    (
        f"apis: [{{name: a, {TF}, batch: {{}}}}]",
        "apis[0].batch: only a kind: BatchAPI has a batch section (this is a RealtimeAPI)",
    ),
    (
        f"apis: [{{name: a, kind: BatchAPI, {TF}, batch: {{}}}}]",
        "apis[0].handler.path: a BatchAPI's batch section runs handle_batch",
    ),
    (
        f"apis: [{{name: a, kind: BatchAPI, handler: {{{PY}}}, batch: {{store: aws}}}}]",
        "apis[0].batch.bucket: store: aws needs the S3 bucket",
    ),
    (
        f"apis: [{{name: a, kind: BatchAPI, handler: {{{PY}}}, batch: {{visibility_timeout: 0}}}}]",
        "apis[0].batch.visibility_timeout: must be more than zero",
    ),
]


@pytest.mark.parametrize(("text", "error"), ERRORS, ids=[row[0][:60] for row in ERRORS])
def test_errors(folder: Path, text: str, error: str) -> None:
    got = error_of(folder, text)
    want = error.replace("{dir}", str(folder))
    if want.startswith("<file>: not valid YAML"):  # yaml's own message follows
        assert got.startswith(want), got
    else:
        assert got == want


# --- the gateway's rules: valid files the gateway cannot serve ------------------------------------

GATEWAY: list[tuple[str, str]] = [
    (
        f"apis: [{{name: p, handler: {{{PY}, multi_model_reloading: {{path: m}}}}}}]",
        "apis[0].handler.multi_model_reloading: python handlers' models come through modelsync: "
        "set gateway.modelsync",
    ),
    (
        "apis: [{name: a, handler: {models: {path: 's3://b/m'}}}]",
        "apis[0].handler.models: s3://b/m/ is on S3: set gateway.modelsync to serve S3 sources",
    ),
    (
        "gateway: {workers: 2, modelsync: 'x:1'}\n"
        f"apis: [{{name: a, handler: {{{PY}, multi_model_reloading: "
        "{path: m, cache_size: 1, disk_cache_size: 1}}}]",
        "apis[0].handler.multi_model_reloading.cache_size: model caching needs gateway.workers: 1 "
        "(each gateway worker runs its own handler workers, so the limits would not hold for the "
        "replica)",
    ),
    (
        "gateway: {workers: 2, listen: 'unix:/tmp/g.sock'}",
        "gateway.listen: several workers need a TCP address, not a unix socket",
    ),
]


@pytest.mark.parametrize(("text", "error"), GATEWAY, ids=[row[1][:60] for row in GATEWAY])
def test_gateway_rules(folder: Path, text: str, error: str) -> None:
    load_text(folder, text)  # the file itself is valid: modelsync, for one, reads it
    assert error_of(folder, text, daemon="gateway") == error


def test_gateway_rules_pass(folder: Path) -> None:
    text = (
        "gateway: {workers: 2, modelsync: 'x:1'}\n"
        f"apis: [{{name: p, kind: AsyncAPI, handler: {{models: {{path: 's3://b/m'}}}}}}, "
        f"{{name: q, handler: {{{PY}, multi_model_reloading: {{path: m}}}}}}]"
    )
    assert len(load_text(folder, text, daemon="gateway").apis) == 2


# --- layers: defaults < YAML < environment < command-line flags ----------------------------------


def test_environment_overrides_yaml(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELMUX_GATEWAY_LISTEN", "127.0.0.1:2")
    monkeypatch.setenv("MODELMUX_GATEWAY_LOG_REQUESTS", "off")
    monkeypatch.setenv("MODELMUX_MODELSYNC_SETTLE", "250ms")
    config = load_text(folder, "gateway: {listen: '127.0.0.1:1', backend_timeout: 3s}\n")
    assert config.gateway.listen == "127.0.0.1:2" and config.gateway.backend_timeout == 3.0
    assert config.gateway.log_requests is False and config.modelsync.settle == 0.25


def test_environment_is_checked_like_the_file(
    folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MODELMUX_GATEWAY_WORKERS", "0")
    assert error_of(folder, "") == "gateway.workers: must be positive"
    with pytest.raises(ConfigError, match=r"gateway\.workers: must be positive"):
        load(None)


def test_flags_override_environment(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELMUX_GATEWAY_LISTEN", "127.0.0.1:2")
    flags: dict[str, dict[str, Any]] = {
        "gateway": {"listen": "127.0.0.1:3", "workers": None}
    }  # None: a flag not given
    config = load_text(folder, "gateway: {workers: 2}", overrides=flags)
    assert config.gateway.listen == "127.0.0.1:3" and config.gateway.workers == 2
    flags = {"gateway": {"listen": "unix:/tmp/g.sock", "workers": 2}}
    assert error_of(folder, "", daemon="gateway", overrides=flags) == (
        "gateway.listen: several workers need a TCP address, not a unix socket"
    )
    assert error_of(folder, "", overrides={"gateway": {"workers": 0}}) == (
        "gateway.workers: must be positive"
    )


def test_defaults_without_a_file() -> None:
    config = load(None)
    assert config.file == "<defaults>" and config.gateway == GatewayConfig()
    assert config.modelsync == ModelsyncConfig()


def test_missing_file() -> None:
    with pytest.raises(ConfigError) as info:
        load("/nonexistent/modelmux.yaml")
    assert str(info.value) == "/nonexistent/modelmux.yaml: <file>: No such file or directory"


# --- coercions on their own ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (10, 10.0),
        (2.5, 2.5),
        ("500ms", 0.5),
        ("10s", 10.0),
        ("5m", 300.0),
        ("2h", 7200.0),
        ("1.5 s", 1.5),
        ("0", 0.0),
    ],
)
def test_parse_duration(text: Any, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "size"),
    [
        (7, 7),
        ("7", 7),
        ("7B", 7),
        ("1KB", 1000),
        ("1KiB", 1024),
        ("3MB", 3 * 10**6),
        ("3MiB", 3 * 2**20),
        ("1GiB", 2**30),
        ("1TB", 10**12),
        ("0.5KiB", 512),
    ],
)
def test_parse_size(text: Any, size: int) -> None:
    assert parse_size(text) == size


# --- the files users have, and the reference written from the declarations -----------------------


@pytest.mark.parametrize("file", sorted(ROOT.glob("examples/**/*.yaml")), ids=str)
def test_examples_load(file: Path) -> None:
    assert load(file, daemon="gateway").apis


def test_reference_is_current() -> None:
    sys.path.insert(0, str(ROOT / "scripts"))
    try:
        import gen_config_docs
    finally:
        sys.path.remove(str(ROOT / "scripts"))
    assert (ROOT / "docs" / "config.md").read_text(encoding="utf-8") == gen_config_docs.render(), (
        "docs/config.md is stale: run make config-docs"
    )


# --- a new section: what declaring one takes (the keys, their kinds, a rule) ----------------------


@dataclass(frozen=True, slots=True)
class _Queue:
    url: str = setting(STRING, "where requests wait", "")
    visibility: float = setting(
        DURATION, "how long a taken request stays hidden", 30.0, range=MORE_THAN_ZERO
    )


@dataclass(frozen=True, slots=True)
class _Example:
    # "async" is a Python keyword: the field has another name, the file the key
    async_: _Queue = section(_Queue, "the API's queue", default=_Queue, key="async")
    workers: int = setting(INTEGER, "queue workers", 1, range=POSITIVE)


@rule(_Example)
def _needs_url(example: _Example, key: str, ctx: Context) -> None:
    """More than one worker needs a queue URL."""
    if example.workers > 1 and not example.async_.url:
        raise ctx.fail(f"{key}.async.url", "required with workers > 1")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (None, _Example()),
        ({"async": {"visibility": "2m"}}, _Example(async_=_Queue(visibility=120.0))),
        ({"async": {"url": "q"}, "workers": 2}, _Example(_Queue(url="q"), 2)),
        ({"async_": {}}, "apis[0].async_: unknown key (known: async, workers)"),
        ({"async": {"visibility": 0}}, "apis[0].async.visibility: must be more than zero"),
        ({"workers": 2}, "apis[0].async.url: required with workers > 1"),
    ],
)
def test_a_declared_section(raw: Any, expected: Any) -> None:
    ctx = Context("f.yaml", ROOT)
    if isinstance(expected, str):
        with pytest.raises(ConfigError) as info:
            read(_Example, raw, "apis[0]", ctx)
        assert f"{info.value.key}: {info.value.reason}" == expected
    else:
        assert read(_Example, raw, "apis[0]", ctx) == expected
