"""shared.wire's packed parameters: one flat array whose key names the layout."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, RecordDict

from shared.privacy.events import MechanismEvent, SpendEvent
from shared.wire import (
    ARRAYS,
    PACKED_PREFIX,
    PRIVACY,
    STATUS_OK,
    MalformedUpdateError,
    PrivacyFacts,
    TrainReply,
    WireError,
    packed_key,
    params_to_record,
    record_to_params,
)

PARAMS = OrderedDict([("encoder.lora_A", np.arange(12, dtype=np.float32).reshape(3, 4)),
                      ("heads.ctr.weight", np.full((1, 4), -2.5, dtype=np.float32)),
                      ("heads.ctr.bias", np.array([0.25], dtype=np.float32)),
                      ("scale", np.array(3.0, dtype=np.float32))])  # a 0-d parameter too


def facts() -> PrivacyFacts:
    event = SpendEvent.of(MechanismEvent(noise_multiplier=1.0, sample_rate=0.1, steps=2, max_grad_norm=1.0),
                          unit_count=40, delta=1e-5, noise="gaussian")
    return PrivacyFacts(merchant_id="shop-a", status=STATUS_OK, dp=True, event=event, epsilon=1.5,
                        epsilon_budget=8.0, accountant="pld", model_version=3)


def test_parameters_travel_as_one_array_and_come_back_equal_in_order_and_shape() -> None:
    record = params_to_record(PARAMS)
    assert len(record) == 1 and packed_key(record) is not None
    (array,) = record.values()
    assert array.shape == (12 + 4 + 1 + 1,)
    back = record_to_params(record)
    assert list(back) == list(PARAMS)
    for name, value in PARAMS.items():
        assert back[name].shape == value.shape and back[name].dtype == value.dtype
        assert np.array_equal(back[name], value)


def test_the_layout_follows_the_dict_order_so_two_orders_are_two_keys() -> None:
    reordered = OrderedDict(reversed(list(PARAMS.items())))
    assert packed_key(params_to_record(reordered)) != packed_key(params_to_record(PARAMS))
    assert list(record_to_params(params_to_record(reordered))) == list(reordered)


def test_parameters_of_two_dtypes_travel_one_array_each() -> None:
    mixed = {"w": np.ones((2, 2), dtype=np.float32), "steps": np.array([7], dtype=np.int64)}
    record = params_to_record(mixed)
    assert list(record) == ["w", "steps"] and packed_key(record) is None
    back = record_to_params(record)
    assert back["steps"].dtype == np.int64 and np.array_equal(back["w"], mixed["w"])


@pytest.mark.parametrize(("layout", "values", "says"), [
    ('[["w",[2,3]]]', 5, "names 6 values in 1 parameters, the array holds 5"),
    ('[["w",[2,3]],["w",[1]]]', 7, "names a parameter twice"),
    ('[["w",[-2,-3]]]', 6, "names 6 values"),
    ('not json', 6, "unreadable layout"),
])
def test_a_packed_record_whose_layout_does_not_fit_its_data_is_refused_by_name(layout: str, values: int,
                                                                                 says: str) -> None:
    record = ArrayRecord(OrderedDict([(PACKED_PREFIX + layout, Array(np.zeros(values, dtype=np.float32)))]))
    with pytest.raises(WireError, match=says):
        record_to_params(record)


def test_a_train_reply_with_readable_facts_but_unreadable_parameters_keeps_its_facts() -> None:
    bad = ArrayRecord(OrderedDict([(PACKED_PREFIX + '[["w",[4]]]', Array(np.zeros(3, dtype=np.float32)))]))
    content = RecordDict({PRIVACY: facts().to_record(), ARRAYS: bad})
    with pytest.raises(MalformedUpdateError) as caught:
        TrainReply.from_recorddict(content)
    assert caught.value.facts == facts()  # the server records this call's spend from them
    assert "the array holds 3" in caught.value.reason


def test_a_train_reply_round_trips_through_its_recorddict() -> None:
    reply = TrainReply(facts=facts(), params=dict(PARAMS), metrics={"num-examples": 40.0, "steps": 2.0})
    parsed = TrainReply.from_recorddict(reply.to_recorddict())
    assert parsed.facts == reply.facts and parsed.metrics == reply.metrics
    assert parsed.params is not None and all(np.array_equal(parsed.params[k], v) for k, v in PARAMS.items())
