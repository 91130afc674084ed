"""The wire: every message between erllama's processes, typed, and the limits and codes they share.

- ``codes``: limits, timeouts, ``ErrorCode``, ``ErllamaError`` and the enums of states and kinds;
- ``params``: ``SamplingParams``, the per-request parameters (validated where they are decoded);
- ``messages``: client <-> broker <-> worker messages and the final ``CompletionResult``;
- ``cache``: requests to the cache store and its replies;
- ``hosts``: broker <-> ``erllama-host`` (join, heartbeats, placing and stopping workers, drain);
- ``kvevents``: what cache stores announce they hold (prefix-block hashes), relayed to the broker's index;
- ``codec``: ``encode`` and the one typed ``Decoder`` per socket (a typed ``protocol_error`` otherwise).

Every message is one msgpack map in one ZeroMQ frame (the cache store's inline fallback may append a raw
payload frame) with a protocol version ``v`` and a type ``t``. Nothing here imports llama.cpp or ZeroMQ.
"""

from erllama.protocol.cache import *
from erllama.protocol.codec import *
from erllama.protocol.codes import *
from erllama.protocol.hosts import *
from erllama.protocol.kvevents import *
from erllama.protocol.messages import *
from erllama.protocol.params import *
