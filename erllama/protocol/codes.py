"""Limits, timeouts, error codes and the enums every erllama process shares.

The messages themselves are in ``messages.py`` and ``cache.py``; this module has no dependency.
"""

from __future__ import annotations

import enum
from typing import Any, Final

PROTOCOL_VERSION: Final = 1

# --- limits ---------------------------------------------------------------------------------------------
# ZMQ_MAXMSGSIZE is per frame: a peer that sends more is disconnected by libzmq before Python sees it.
MAX_CLIENT_FRAME_BYTES: Final = 16 * 1024 * 1024  # a 128k-token prompt as text or ids fits easily
MAX_WORKER_FRAME_BYTES: Final = 64 * 1024 * 1024  # embeddings and tokenize replies of long prompts
MAX_CACHE_CONTROL_BYTES: Final = 1024 * 1024  # control maps to and from the cache store
MAX_CACHE_PAYLOAD_BYTES: Final = 2 * 1024 * 1024 * 1024  # one KV row sent as a raw frame (RAM tier)
MAX_ID_CHARS: Final = 128  # request, model and session ids
MAX_PROMPT_TOKENS: Final = 1 << 20
MAX_STOP_SEQUENCES: Final = 16
MAX_STOP_SEQUENCE_BYTES: Final = 256
MAX_TOKENS_LIMIT: Final = 1 << 20
DEFAULT_MAX_QUEUE: Final = 512
DEFAULT_MODEL_ID: Final = "smollm2-135m"

# --- liveness -------------------------------------------------------------------------------------------
HEARTBEAT_INTERVAL_S: Final = 1.0
# Workers send heartbeats from a thread of their own, so they keep coming while llama_decode
# runs: silence means the process is gone (or frozen), not that a prefill is slow.
WORKER_SILENCE_TIMEOUT_S: Final = 10.0
# A busy worker whose decode counter has not moved for this long is stuck in native code. One
# tick is one llama_decode of at most n_batch tokens: seconds on a CPU, never minutes.
WORKER_STALL_TIMEOUT_S: Final = 120.0
BROKER_SILENCE_TIMEOUT_S: Final = 10.0
# A host (erllama-host) beats every HEARTBEAT_INTERVAL_S from its own loop, which never blocks on a
# model: five missed beats is a dead host (process gone, machine down, or the network between us cut).
HOST_SILENCE_TIMEOUT_S: Final = 5.0
MODEL_LOAD_TIMEOUT_S: Final = 300.0
DEFAULT_REQUEST_TIMEOUT_S: Final = 600.0


class ErrorCode(enum.StrEnum):
    """Stable error codes; the client raises ``ErllamaError`` with one of these as ``code``."""

    MODEL_NOT_FOUND = "model_not_found"
    ALREADY_LOADED = "already_loaded"
    INVALID_PARAMS = "invalid_params"
    CONTEXT_OVERFLOW = "context_overflow"
    OVERLOADED = "overloaded"
    LOAD_FAILED = "load_failed"
    MALFORMED_GGUF = "malformed_gguf"
    WORKER_CRASHED = "worker_crashed"
    TIMEOUT = "timeout"
    PROTOCOL_ERROR = "protocol_error"
    SHUTTING_DOWN = "shutting_down"
    STICKY_BUSY = "sticky_busy"
    INVALID_GRAMMAR = "invalid_grammar"
    INVALID_CONTENT = "invalid_content"  # chat content given as a list of blocks
    NO_TEMPLATE = "no_template"  # the model has no chat template
    TEMPLATE_FAILED = "template_failed"  # another request is using the same session_id
    BROKER_LOST = "broker_lost"  # the connection to the broker dropped while the request was in flight
    CLIENT_CLOSED = "client_closed"  # Client.close() ran while the request was in flight
    MODEL_FAILED = "model_failed"
    NOT_SUPPORTED = "not_supported"
    NO_GPU = "no_gpu"
    UNSUPPORTED_MODEL = "unsupported_model"  # a model kind erllama cannot serve (encoder-decoder, diffusion)
    HOST_NOT_FOUND = "host_not_found"  # load_model(host=...) names a host that has not joined
    HOST_DOWN = "host_down"  # the model's host is dead, draining or gone: the model is unavailable
    HOST_REFUSED = "host_refused"  # a host's join was refused (unknown key, no CURVE, a name in use)
    INTERNAL = "internal"
    # cache store
    NOT_FOUND = "not_found"
    CONFLICT = "conflict"
    CORRUPT = "corrupt"
    OVER_BUDGET = "over_budget"
    NO_SPACE = "no_space"
    EXPIRED = "expired"
    IO_ERROR = "io_error"


class ErllamaError(Exception):
    """The one exception family of erllama. ``code`` is an ``ErrorCode`` value (a plain str)."""

    def __init__(self, code: ErrorCode | str, message: str = "", detail: dict[str, Any] | None = None):
        self.code = str(code)
        self.message = message or self.code
        self.detail = detail or {}
        super().__init__(f"{self.code}: {self.message}")


class MsgType(enum.StrEnum):
    """Message types between client, broker and worker."""

    # client -> broker
    INFER = "infer"
    CANCEL = "cancel"
    LOAD_MODEL = "load_model"
    UNLOAD_MODEL = "unload_model"
    LIST_MODELS = "list_models"
    MODEL_INFO = "model_info"
    QUEUE_DEPTH = "queue_depth"
    CALL = "call"  # an operation answered by the model's worker (tokenize, detokenize, ...)
    CACHED_PREFIX_LEN = "cached_prefix_len"  # answered by the cache store, no worker hop
    VRAM_INFO = "vram_info"  # answered by the broker (pynvml); no_gpu without one
    PING = "ping"
    LIST_HOSTS = "list_hosts"  # the host table: resources, state, heartbeat age
    # broker -> client (TOKEN, DONE, ERROR also flow worker -> broker)
    OK = "ok"
    TOKEN = "tok"
    DONE = "done"
    ERROR = "err"
    # worker -> broker
    READY = "ready"
    HEARTBEAT = "hb"
    ADMITTED = "admitted"
    SPAN_END = "span_end"  # the end of a thinking block (with its signature) or of a tool call (its bytes)
    # broker -> worker
    RUN = "run"
    CANCEL_RUN = "cancel_run"
    OP = "op"  # a client's CALL, addressed by the broker's rid
    SHUTDOWN = "shutdown"
    BROKER_HEARTBEAT = "bhb"  # to each worker's heartbeat socket; carries the broker's instance id


class WorkerOp(enum.StrEnum):
    """Operations a client may ask of a model's worker through ``MsgType.CALL``."""

    TOKENIZE = "tokenize"
    DETOKENIZE = "detokenize"
    END_SESSION = "end_session"
    EVICT = "evict"  # save every running context and idle session (reason evict); nothing stops
    SHUTDOWN_SAVE = "shutdown"  # the same with reason shutdown
    APPLY_CHAT_TEMPLATE = "apply_chat_template"
    EMBED = "embed"
    LOAD_ADAPTER = "load_adapter"
    UNLOAD_ADAPTER = "unload_adapter"
    SET_ADAPTER_SCALE = "set_adapter_scale"
    LIST_ADAPTERS = "list_adapters"


class Phase(enum.StrEnum):
    IDLE = "idle"
    PREFILLING = "prefilling"
    GENERATING = "generating"


class ModelState(enum.StrEnum):
    LOADING = "loading"
    READY = "ready"
    RESTARTING = "restarting"
    FAILED = "failed"
    UNLOADING = "unloading"
    DRAINING = "draining"  # its host drains: accepted requests finish, new ones are refused
    UNAVAILABLE = "unavailable"  # its host is dead or gone; placed again when the host joins again


class HostMsgType(enum.StrEnum):
    """Message types between the broker and an ``erllama-host``."""

    # host -> broker
    JOIN = "host_join"
    BEAT = "host_beat"
    SPAWNED = "host_spawned"  # a worker process started for a placement (its pid)
    EXITED = "host_exited"  # a worker process ended (exit status or signal, stderr tail)
    DRAIN = "host_drain"  # SIGTERM: no new placements; the host leaves once its workers are gone
    LEAVE = "host_leave"
    # broker -> host
    WELCOME = "host_welcome"
    SPAWN = "host_spawn"
    STOP = "host_stop"
    KV_RESYNC = "host_kv_resync"  # the broker's index lost track of our store: send a snapshot next


class HostState(enum.StrEnum):
    JOINING = "joining"  # joined; not yet reported its cache store up
    UP = "up"
    DRAINING = "draining"
    LEFT = "left"
    DEAD = "dead"  # silent for HOST_SILENCE_TIMEOUT_S


class FinishReason(enum.StrEnum):
    STOP = "stop"
    LENGTH = "length"
    CANCELLED = "cancelled"


class MemoryKind(enum.StrEnum):
    """What a model keeps per sequence, which decides which cached rows restore exactly (README, *The KV cache*)."""

    TRANSFORMER = "transformer"  # attention KV for every position: any prefix of a row restores exactly
    SWA = "swa"  # sliding-window layers keep only the last n_swa positions: a row restores only near its end
    RECURRENT = "recurrent"  # one state per sequence (Mamba, RWKV): a row restores only whole
    HYBRID = "hybrid"  # attention and recurrent layers: a row restores only whole


class CacheHitKind(enum.StrEnum):
    EXACT = "exact"
    PARTIAL = "partial"
    STICKY = "sticky"
    SHARED = "shared"  # copied from a request running in the same worker with the same prompt start
    COLD = "cold"


# --- the cache store ------------------------------------------------------------------------------------

MAX_ROW_TOKENS: Final = (
    131_072  # 512 KiB of token ids: a reserve map stays well under MAX_CACHE_CONTROL_BYTES
)
MAX_FINGERPRINT_BYTES: Final = 255  # stored as a u8 length in the row header


class CacheMsgType(enum.StrEnum):
    EXACT = "c.exact"  # key -> row metadata or null
    PREFIX = "c.prefix"  # fp, tokens -> the stored row sharing the longest token prefix, or null
    LOAD = "c.load"  # key -> a lease and where to map the row (inline: the row as a raw frame)
    RELEASE = "c.release"  # end a lease
    RESERVE = "c.reserve"  # announce a row; get a temp to fill, or already_present / conflict
    COMMIT = "c.commit"  # the temp is written (inline: the payload follows as a raw frame); verify, publish
    ABORT = "c.abort"  # give a reservation back
    STATS = "c.stats"
    EVICT = "c.evict"  # free bytes in some tiers (memory-pressure watcher)
    BYE = "c.bye"  # the client is closing: end its leases and reservations now
    KV_EVENTS = "c.kv_events"  # what rows appeared, left or moved since a sequence number (or a snapshot)
    OK = "c.ok"
    ERROR = "err"  # same wire value as MsgType.ERROR (the ``Error`` message)


class CacheTier(enum.StrEnum):
    RAM = "ram"  # memfds owned by the daemon: gone when it exits
    SHM = "shm"  # files under /dev/shm: survive a daemon restart
    DISK = "disk"  # files in the cache directory: survive a reboot
    # Only in a lookup's answer: the row was fetched from the shared Valkey/Redis tier for this lookup
    # (it then lives in one of the local tiers above). Never a tier to reserve in or evict from.
    SHARED = "shared"


LOCAL_TIERS: Final = (CacheTier.RAM, CacheTier.SHM, CacheTier.DISK)  # hottest first: where rows live


class KvEventKind(enum.StrEnum):
    """What happened to a row, in a cache store's KV events (``kvevents``)."""

    STORED = "stored"  # became visible: committed, or fetched from the shared tier
    REMOVED = "removed"  # evicted or deleted
    MOVED = "moved"  # changed tier (demotion or promotion)


class SaveReason(enum.StrEnum):
    COLD = "cold"
    CONTINUED = "continued"
    FINISH = "finish"
    EVICT = "evict"
    SHUTDOWN = "shutdown"


class ReserveStatus(enum.StrEnum):
    RESERVED = "reserved"
    ALREADY_PRESENT = "already_present"
    CONFLICT = "conflict"


class SaveOutcome(enum.StrEnum):
    """What ``CacheClient.save`` reports; none of these is an error for the caller."""

    STORED = "stored"
    ALREADY_PRESENT = "already_present"
    CONFLICT = "conflict"  # another writer is publishing the same key right now
    DROPPED = "dropped"  # the store refused or lost it (over budget, no space, expired, bad checksum)
