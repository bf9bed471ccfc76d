"""vLLM general-plugin hook: runs early in every process vLLM starts.

vLLM calls ``vllm.general_plugins`` entry points in its argument parser, its engine core and
each worker, before any model step, and may call them more than once per process; everything
here is idempotent.
"""

from __future__ import annotations

from kvbm.process import parent_watch
from kvbm.process.cpu_features import request_amx_permission

CONNECTOR_NAME = "KVBMConnector"


def register() -> None:
    """Prepares the current process for vLLM.

    Requests AMX tile permission so vLLM's bf16 CPU attention cannot die with SIGILL when
    attention is the process's first AMX user (see :mod:`kvbm.process.cpu_features`), makes a
    server that kvbm's serve command started exit with it (:mod:`kvbm.process.parent_watch`),
    and registers ``KVBMConnector`` so
    ``--kv-transfer-config '{"kv_connector": "KVBMConnector", ...}'`` works without a module path.
    """
    request_amx_permission()
    parent_watch.watch()
    from vllm.distributed.kv_transfer.kv_connector.factory import KVConnectorFactory

    if CONNECTOR_NAME not in KVConnectorFactory._registry:  # no public "is registered" query
        KVConnectorFactory.register_connector(CONNECTOR_NAME, "kvbm.connectors.vllm.connector", "KVBMConnector")
