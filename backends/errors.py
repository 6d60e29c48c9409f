"""One exception tree for everything a backend can fail with.

    BackendError                    base; `retryable` says if the same call may succeed later
    ├── BackendRequestRejected      the backend refused this request (400/404/422): not retried
    │   └── ContentRefused          the prompt or output broke the provider's content policy
    ├── BackendAuthError            401/402/403: key, account or credits; opens the breaker
    ├── BackendRateLimited          429; carries retry_after_s when the provider said
    │   └── BackendPaced            our own pacing held the call back (rate limit, Retry-After): nothing sent
    ├── BackendTransientError       5xx, connect/read errors, malformed or truncated replies
    │   └── BackendTimeout          the deadline passed before the backend answered
    │       └── BackendQueueTimeout the deadline passed while the job still waited in the backend's queue
    └── BackendUnavailable          not ready, unconfigured or shutting down
        └── BackendReleased         a queue gave the job back unstarted, in time for the next backend

Vendor payloads and errors are translated into these only inside each backend module;
the gateway maps them to HTTP in one place (gateway/errors.py).
"""

from __future__ import annotations

__all__ = [
    "BackendAuthError",
    "BackendError",
    "BackendPaced",
    "BackendQueueTimeout",
    "BackendRateLimited",
    "BackendReleased",
    "BackendRequestRejected",
    "BackendTimeout",
    "BackendTransientError",
    "BackendUnavailable",
    "ContentRefused",
]


class BackendError(Exception):
    """A backend could not produce the images; `kind` is the stable class name for audit."""

    retryable: bool = False

    def __init__(self, message: str, *, status: int | None = None, provider_code: str | None = None):
        super().__init__(message)
        self.message = message
        self.status = status
        self.provider_code = provider_code

    @property
    def kind(self) -> str:
        return type(self).__name__


class BackendRequestRejected(BackendError):
    """The backend says the request itself is wrong for it."""


class ContentRefused(BackendRequestRejected):
    """The provider's content policy refused the prompt or its output."""


class BackendAuthError(BackendError):
    """Credentials, account or credits: nothing will work until ops act."""


class BackendRateLimited(BackendError):
    retryable = True

    def __init__(self, message: str, *, retry_after_s: float | None = None, **kw):
        super().__init__(message, **kw)
        self.retry_after_s = retry_after_s


class BackendPaced(BackendRateLimited):
    """The backend's pacer (requests per minute, a provider's Retry-After) could not let the call go before its
    deadline: nothing was sent, so it says nothing of the backend's health; the next candidate may serve."""

    retryable = False


class BackendTransientError(BackendError):
    retryable = True


class BackendTimeout(BackendTransientError):
    """No answer before the deadline."""


class BackendQueueTimeout(BackendTimeout):
    """The deadline passed while the job still waited in the backend's own queue (the local pool's): it never
    started, so the backend was busy or a worker was restarting, not broken. A timeout like any other to the
    client and the audit; never counted towards ejecting the backend (which would refuse the next requests
    while the queue drains)."""


class BackendUnavailable(BackendError):
    """The backend cannot take work now (warming, unconfigured, closed)."""


class BackendReleased(BackendUnavailable):
    """The local pool gave a queued job back unstarted: it would have finished late, and the job's
    next candidate can still make its deadline (late binding, policies.batching). Says nothing of health."""
