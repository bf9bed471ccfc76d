"""Hostile ``kv_connector_extra_config``: any JSON value gives a config or a ConfigError."""

from __future__ import annotations

import dataclasses

from hypothesis import given, settings
from hypothesis import strategies as st

from kvbm.config import KvbmConfig
from kvbm.connectors.vllm.config import ConnectorConfig
from kvbm.errors import ConfigError
from kvbm.remote.config import RemoteConfig

KEYS = sorted(
    {f.name for f in dataclasses.fields(ConnectorConfig)} - {"kvbm"} | {f.name for f in dataclasses.fields(KvbmConfig)}
)
REMOTE_KEYS = sorted(f.name for f in dataclasses.fields(RemoteConfig))

json_scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=12),
    st.sampled_from(["1GiB", "64MiB", "0", "-1", "g2", "write_through", "wipe", "/tmp"]),
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=8), inner, max_size=3)),
    max_leaves=6,
)
remote_dicts = st.dictionaries(st.sampled_from(REMOTE_KEYS + ["bogus"]), json_values, max_size=4)
configs = st.dictionaries(st.sampled_from(KEYS + ["unknown_key"]), st.one_of(json_values, remote_dicts), max_size=5)


@settings(max_examples=400, deadline=None)
@given(configs)
def test_extra_config_is_parsed_or_refused_by_name(raw):
    try:
        config = ConnectorConfig.from_extra_config(raw)
    except ConfigError as error:
        assert error.field.split(".")[0] in raw, f"error names {error.field!r}, not one of {sorted(raw)}"
    else:
        assert isinstance(config.kvbm, KvbmConfig)
