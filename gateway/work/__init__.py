"""The durable work layer under the Async and Batch APIs: one queue and one store interface
(:mod:`gateway.work.base`), embedded (:func:`open_embedded`: SQLite and files in a state folder)
or at scale (:func:`open_aws`: SQS and S3). The contract is in docs/work.md.

Importable without the gateway: nothing here depends on grpc or the gateway's server.
"""

from gateway.work.aws import AwsConfig, AwsWork, open_aws
from gateway.work.base import (
    AlreadyExists,
    Blob,
    Conflict,
    Entry,
    Lease,
    LeaseLost,
    Message,
    Page,
    Put,
    Queue,
    QueueGone,
    QueueStats,
    Store,
    Unavailable,
    Work,
    WorkError,
    holding,
    queue_name,
)
from gateway.work.configured import StoreSettings, open_configured
from gateway.work.embedded import EmbeddedWork, open_embedded

__all__ = [
    "AlreadyExists",
    "AwsConfig",
    "AwsWork",
    "Blob",
    "Conflict",
    "EmbeddedWork",
    "Entry",
    "Lease",
    "LeaseLost",
    "Message",
    "Page",
    "Put",
    "Queue",
    "QueueGone",
    "QueueStats",
    "Store",
    "StoreSettings",
    "Unavailable",
    "Work",
    "WorkError",
    "holding",
    "open_aws",
    "open_configured",
    "open_embedded",
    "queue_name",
]
