"""One retry policy: which failures waiting cures, and how long to wait between attempts.

Capture (the source), apply (the target), the cluster batches and the logs all wait the same way:
a first pause of FIRST_WAIT_S, doubled after each failed attempt up to a ceiling per side, for as
long as it takes (a stop interrupts) unless a limit is named here. What is transient differs by
side only in the replies a server sends while it is there but not ready; those lists are here too.
"""
from __future__ import annotations

from typing import Callable

import redis
from tenacity import Retrying, retry_if_exception, retry_if_exception_type, stop_never
from tenacity import wait_exponential

from conveyor.errors import SourceError

# -- how long ----------------------------------------------------------------------------------------
FIRST_WAIT_S = 0.2              # first pause after a transient failure; doubles after each attempt
SOURCE_MAX_WAIT_S = 5.0         # a source outage is retried (and reported) at least this often
TARGET_MAX_WAIT_S = 30.0        # longest pause between two attempts at a batch (target down)
LOG_MAX_WAIT_S = 30.0           # longest pause between two calls to a log that is unavailable
LOG_OPEN_FIRST_WAIT_S = 0.5     # opening a log at start: first pause (then --log-wait bounds it)
CLUSTER_ROUNDS = 60             # rounds of redirections followed within one cluster batch, then
                                # the last error goes to the caller's own waiting
CLUSTER_WAIT_S = (0.05, 2.0)    # pause between two rounds: first, longest
KAFKA_REJOIN_ATTEMPTS = 50      # a commit refused by a rebalance under way: rejoin, commit again
KAFKA_REJOIN_PAUSE_S = 0.2

# -- what is transient -------------------------------------------------------------------------------
# A source (or the buffer Redis of a log) that is there but not ready yet.
SOURCE_NOT_READY = ("LOADING", "MASTERDOWN", "TRYAGAIN")
LOG_NOT_READY = ("LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN")
# A target that cannot take a batch now: exceptions and reply prefixes ("not now", not "never").
TARGET_NOT_NOW = (redis.ConnectionError, redis.TimeoutError, redis.BusyLoadingError,
                  redis.exceptions.OutOfMemoryError, redis.ReadOnlyError,
                  redis.exceptions.TryAgainError, redis.exceptions.ClusterDownError,
                  redis.exceptions.MasterDownError, OSError,
                  # A cluster changing under apply (conveyor.cluster follows these for a while,
                  # then hands the last one over): waited out like a target that is down.
                  redis.exceptions.AskError, redis.exceptions.SlotNotCoveredError)
TARGET_NOT_NOW_REPLIES = ("BUSY ", "NOREPLICAS", "MISCONF", "LOADING", "OOM", "READONLY",
                          "TRYAGAIN", "CLUSTERDOWN", "MASTERDOWN", "MOVED ", "ASK ")
# Replies that waiting will not fix: a missing permission, or refused credentials.
REFUSED_REPLIES = ("NOPERM", "NOAUTH", "WRONGPASS")


def transient_source_error(e: BaseException) -> bool:
    """A failure of the source that waiting cures: down, restarting or loading its data."""
    if isinstance(e, redis.AuthenticationError):
        return False                              # a ConnectionError in redis-py, but final
    if isinstance(e, (redis.ConnectionError, redis.TimeoutError, OSError)):
        return True                               # BusyLoadingError (LOADING) is one of these
    if isinstance(e, redis.ResponseError):
        return str(e).startswith(SOURCE_NOT_READY)
    if isinstance(e, SourceError) and e.__cause__ is not None:
        return transient_source_error(e.__cause__)   # Endpoint.connect wraps the driver's error
    return False


def cluster_pause(round_: int) -> float:
    """The pause after cluster batch round ``round_`` (0-based) left commands redirected."""
    first, most = CLUSTER_WAIT_S
    return min(first * (2 ** round_), most)


def policy(*, on: type[BaseException] | tuple | Callable[[BaseException], bool], max_wait_s: float,
           first_wait_s: float = FIRST_WAIT_S, sleep: Callable[[float], object] | None = None,
           before_sleep: Callable | None = None, stop=stop_never, reraise: bool = False
           ) -> Retrying:
    """A tenacity Retrying of the one policy: attempts while the failure is ``on`` (exception
    types, or a predicate), pauses from ``first_wait_s`` doubling up to ``max_wait_s``."""
    retry = (retry_if_exception(on) if callable(on) and not isinstance(on, type)
             else retry_if_exception_type(on))
    kw = {"sleep": sleep} if sleep is not None else {}
    return Retrying(retry=retry, wait=wait_exponential(multiplier=first_wait_s, min=first_wait_s,
                                                       max=max_wait_s),
                    stop=stop, before_sleep=before_sleep, reraise=reraise, **kw)
