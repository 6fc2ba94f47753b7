"""modelmux's Python client: typed tensors in and out as numpy arrays, sync and asyncio.

```python
import numpy as np
from modelmux.client import Client

with Client("127.0.0.1:8500") as client:
    result = client.predict("half_plus_two", {"x": np.array([1.0, 2.0], dtype=np.float32)})
    print(result.version, result["y"])
```

``AsyncClient`` has the same methods, awaited. Both take the same options (deadline, retry
policy, TLS, several channels for several gateway workers): see ``Client``. Failed calls raise a
``ModelmuxError`` subclass per status (``NotFoundError``, ``UnavailableError``, ...).

Async requests (``modelmux.v1.Async``): ``submit`` returns an id at once; ``get``, ``watch``,
``cancel`` and ``list_requests`` report an ``AsyncRequest`` (state, attempts, times, result or
error). Batch jobs (``modelmux.v1.Jobs``): ``submit_job`` returns the job at once (or, with
``dry_run``, what it would process); ``get_job``, ``watch_job``, ``list_jobs`` and ``stop_job``
report a ``Job`` (status, batch counts, times, errors); ``failed_batches`` lists each failed
batch with its error and items.
"""

from modelmux.client.aio import AsyncClient
from modelmux.client.calls import (
    AsyncRequest,
    AsyncState,
    HealthStatus,
    JsonValue,
    Payload,
    Prediction,
)
from modelmux.client.errors import (
    AlreadyExistsError,
    DeadlineExceededError,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    ModelmuxError,
    NotFoundError,
    PermissionDeniedError,
    ResourceExhaustedError,
    UnauthenticatedError,
    UnavailableError,
)
from modelmux.client.jobs import DryRun, FailedBatch, Job, JobStatus
from modelmux.client.options import RetryPolicy, Tls
from modelmux.client.sync import Client
from modelmux.v1.models_pb2 import Model, WatchModelsResponse

__all__ = [
    "AlreadyExistsError",
    "AsyncClient",
    "AsyncRequest",
    "AsyncState",
    "Client",
    "DeadlineExceededError",
    "DryRun",
    "FailedBatch",
    "FailedPreconditionError",
    "HealthStatus",
    "InternalError",
    "InvalidArgumentError",
    "Job",
    "JobStatus",
    "JsonValue",
    "Model",
    "ModelmuxError",
    "NotFoundError",
    "Payload",
    "PermissionDeniedError",
    "Prediction",
    "ResourceExhaustedError",
    "RetryPolicy",
    "Tls",
    "UnauthenticatedError",
    "UnavailableError",
    "WatchModelsResponse",
]
