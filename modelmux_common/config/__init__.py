"""One YAML file configures every modelmux daemon.

The file is a mapping with the sections ``gateway``, ``modelsync``, ``backends``, ``version_labels``
and ``apis`` (a list of Cortex-style API specs), each declared once in :mod:`.schema` (types,
defaults, coercions, ranges, meaning) with the rules between keys in :mod:`.rules`; docs/config.md
is written from them (``make config-docs``). Values are layered: defaults < YAML < environment
(``MODELMUX_<SECTION>_<KEY>``, e.g. ``MODELMUX_GATEWAY_LISTEN``) < CLI flags (``load``'s
``overrides``). A bad file fails at start with the file, the key and the reason.
"""

from modelmux_common.config.fields import NAME_RE, ConfigError, parse_duration, parse_size
from modelmux_common.config.loader import load
from modelmux_common.config.schema import (
    ACCELERATORS,
    Accelerator,
    ApiConfig,
    AsyncConfig,
    BackendConfig,
    BatchConfig,
    ClientTls,
    Config,
    GatewayConfig,
    ModelSource,
    ModelsyncConfig,
    Seconds,
    ServerTls,
)

__all__ = [
    "ACCELERATORS",
    "NAME_RE",
    "Accelerator",
    "ApiConfig",
    "AsyncConfig",
    "BackendConfig",
    "BatchConfig",
    "ClientTls",
    "Config",
    "ConfigError",
    "GatewayConfig",
    "ModelSource",
    "ModelsyncConfig",
    "Seconds",
    "ServerTls",
    "load",
    "parse_duration",
    "parse_size",
]
