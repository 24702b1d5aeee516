"""Python client of ern-registry, the pseudonymised patient registry of the European
Reference Networks.

>>> from ern_registry import Client
>>> client = Client("127.0.0.1:50051")            # API key from ERN_API_KEY
>>> df = client.diagnostic_delay("ERN-LUNG", group_by=["onset_age_band"])
>>> df.ern.mask, df.ern.k, df.ern.suppressed, df.ern.as_of

The generated stubs are :mod:`ern_registry.v1` (``case_pb2``, ``research_pb2``, ...).
"""

from . import errors, frames
from .client import (
    NO_RETRY,
    Client,
    RetryPolicy,
    SubmissionResult,
    Submitted,
    call_with_retries,
    consent,
    national,
    submission,
)
from .errors import (
    Aborted,
    AlreadyExists,
    ConsentRequired,
    DeadlineExceeded,
    FailedPrecondition,
    FieldViolation,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    RateLimited,
    RegistryError,
    TooLarge,
    Unauthenticated,
    Unavailable,
)
from .frames import suppression_mask


def plot_diagnostic_delay(*args, **kwargs):  # type: ignore[no-untyped-def]
    """See :func:`ern_registry.plot.plot_diagnostic_delay` (needs the ``plot`` extra)."""
    from .plot import plot_diagnostic_delay as plot

    return plot(*args, **kwargs)


__version__ = "0.1.0"

__all__ = [
    "Client",
    "RetryPolicy",
    "NO_RETRY",
    "Submitted",
    "SubmissionResult",
    "call_with_retries",
    "consent",
    "national",
    "submission",
    "suppression_mask",
    "plot_diagnostic_delay",
    "errors",
    "frames",
    "RegistryError",
    "InvalidArgument",
    "FieldViolation",
    "FailedPrecondition",
    "ConsentRequired",
    "PermissionDenied",
    "Unauthenticated",
    "NotFound",
    "AlreadyExists",
    "Aborted",
    "RateLimited",
    "TooLarge",
    "Unavailable",
    "DeadlineExceeded",
    "Internal",
]
