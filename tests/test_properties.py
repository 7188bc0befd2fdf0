"""Property-based tests (hypothesis) of the models and of input handling at the edges."""

from __future__ import annotations

import json
import string
from datetime import timezone
from uuid import uuid4

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError
from temporalio.contrib.pydantic import pydantic_data_converter

from handoff.cli.common import Usage, json_object_arg
from handoff.client import build_request
from handoff.errors import InvalidRequest
from handoff.models import (
    AGENT_ID_RE,
    AgentCapability,
    ChainRecord,
    ChainStatus,
    HandoffContext,
    check_agent_id,
)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**53, 2**53) | st.text(max_size=20)
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)
json_objects = st.dictionaries(st.text(max_size=8), json_values, max_size=5)
agent_ids = st.from_regex(AGENT_ID_RE, fullmatch=True)


@given(agent_id=agent_ids, context=json_objects, previous=st.lists(json_objects, max_size=4),
       depth=st.integers(0, 5), task=st.text(min_size=1, max_size=50))
def test_contexts_round_trip_through_the_temporal_data_converter(agent_id, context, previous, depth, task):
    ctx = HandoffContext(chain_id=uuid4(), from_agent="starter", to_agent=agent_id, task_description=task,
                         context_data=context, previous_results=previous, chain_depth=depth)
    [payload] = pydantic_data_converter.payload_converter.to_payloads([ctx])
    [back] = pydantic_data_converter.payload_converter.from_payloads([payload], [HandoffContext])
    assert back == ctx


@given(st.text(max_size=70))
def test_agent_ids_are_accepted_exactly_when_they_match_the_pattern(value):
    valid = AGENT_ID_RE.match(value) is not None
    try:
        check_agent_id(value)
        accepted = True
    except ValueError:
        accepted = False
    assert accepted == valid
    if valid:
        assert value[0] in string.ascii_lowercase and len(value) <= 63


@given(depth=st.integers(-10, 10))
def test_chain_depth_outside_0_to_5_is_refused(depth):
    build = lambda: HandoffContext(to_agent="a", task_description="t", chain_depth=depth)  # noqa: E731
    if 0 <= depth <= 5:
        assert build().chain_depth == depth
    else:
        with pytest.raises(ValidationError):
            build()


@settings(max_examples=200)
@given(to_agent=st.one_of(st.none(), st.text(max_size=10), agent_ids),
       capability=st.one_of(st.none(), st.text(max_size=12), st.sampled_from([c.value for c in AgentCapability])),
       task=st.text(max_size=10), hop_timeout=st.one_of(st.none(), st.floats(allow_nan=True)),
       max_depth=st.one_of(st.none(), st.integers(-3, 9)),
       chain_id=st.one_of(st.none(), st.text(max_size=36), st.uuids().map(str)))
def test_build_request_accepts_or_raises_invalid_request_only(to_agent, capability, task, hop_timeout,
                                                              max_depth, chain_id):
    try:
        request = build_request(task_description=task, to_agent=to_agent, capability=capability,
                                hop_timeout=hop_timeout, max_depth=max_depth, chain_id=chain_id)
    except InvalidRequest as err:
        assert str(err) and "\n" not in str(err)
        return
    assert (request.to_agent != "") != (request.capability is not None)
    assert 1 <= request.policy.max_depth <= 5 and request.policy.hop_timeout_s > 0
    assert request.task_description.strip()


@given(st.text(max_size=40).filter(lambda t: not t.startswith("@")))  # @ names a file
def test_cli_context_is_a_json_object_or_one_line_usage_error(text):
    try:
        value = json_object_arg(text)
    except Usage as err:
        assert "\n" not in str(err)
        return
    assert isinstance(value, dict) and value == json.loads(text)


@given(st.builds(ChainRecord, chain_id=st.uuids(), status=st.sampled_from(list(ChainStatus)),
                 task_description=st.text(max_size=20),
                 started_at=st.datetimes(timezones=st.just(timezone.utc)), final_result=json_objects))
def test_chain_records_round_trip_as_json(record):
    assert ChainRecord.model_validate_json(record.model_dump_json()) == record
