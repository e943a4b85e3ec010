"""client.policy: the merchant's pinned settings against a run's request."""

from __future__ import annotations

import logging

import pytest

from client.policy import MerchantPolicy, PolicyError, delta_refusal
from shared.config import RunConfig


def test_nothing_pinned_refuses_nothing_and_changes_nothing() -> None:
    policy = MerchantPolicy.from_node_config({"partition-id": 0, "num-partitions": 3})  # a simulated node
    config = RunConfig(dp=False, noise_multiplier=0.1)
    assert policy.refusal(config) == ""
    assert policy.apply(config) is config


@pytest.mark.parametrize("pinned", [True, "true", "1"])
def test_a_merchant_pinning_dp_refuses_a_non_private_run(pinned: object) -> None:
    policy = MerchantPolicy.from_node_config({"dp": pinned})
    assert "dp = false" in policy.refusal(RunConfig(dp=False))
    assert policy.refusal(RunConfig(dp=True)) == ""


def test_a_noise_floor_refuses_less_noise_and_accepts_more() -> None:
    policy = MerchantPolicy.from_node_config({"noise-multiplier": "0.8"})
    assert "noise floor" in policy.refusal(RunConfig(noise_multiplier=0.5))
    assert policy.refusal(RunConfig(noise_multiplier=0.8)) == ""
    assert policy.refusal(RunConfig(noise_multiplier=1.2)) == ""
    # dp is not pinned here: a non-private run has no noise for the floor to guard
    assert policy.refusal(RunConfig(dp=False, noise_multiplier=0.5)) == ""


def test_a_merchant_pinning_secure_aggregation_refuses_a_run_that_would_see_its_update() -> None:
    policy = MerchantPolicy.from_node_config({"aggregation": "secagg+"})
    assert "update in the clear" in policy.refusal(RunConfig())
    assert policy.refusal(RunConfig(aggregation="secagg+")) == ""
    assert MerchantPolicy.from_node_config({"aggregation": "plain"}).refusal(RunConfig()) == ""  # pins nothing


def test_a_merchant_level_ceiling_refuses_runs_without_it_or_above_it() -> None:
    policy = MerchantPolicy.from_node_config({"merchant-epsilon": "4"})
    assert "update in the clear" in policy.refusal(RunConfig())  # the ceiling needs secagg+ too
    assert "asks for none" in policy.refusal(RunConfig(aggregation="secagg+"))
    assert "asks for 8" in policy.refusal(RunConfig(aggregation="secagg+", merchant_epsilon=8.0))
    assert policy.refusal(RunConfig(aggregation="secagg+", merchant_epsilon=3.0)) == ""


@pytest.mark.parametrize(("node", "message"), [({"dp": "maybe"}, "dp = 'maybe'"),
                                               ({"noise-multiplier": "-1"}, "noise-multiplier = '-1'"),
                                               ({"noise-multiplier": "lots"}, "noise-multiplier = 'lots'"),
                                               ({"aggregation": "secret"}, "aggregation = 'secret'"),
                                               ({"merchant-epsilon": "0"}, "merchant-epsilon = '0'")])
def test_unreadable_pins_are_refused_naming_key_and_value(node: dict[str, str], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        MerchantPolicy.from_node_config(node)


def test_the_merchants_own_values_replace_the_runs(caplog: pytest.LogCaptureFixture) -> None:
    policy = MerchantPolicy.from_node_config({"test-fraction": 0.25, "split-seed": 7, "history-length": 0,
                                              "precondition-corpus": "", "max-grad-norm": "0.5"})
    asked = RunConfig(test_fraction=0.9, split_seed=1, history_length=3, precondition_corpus="/etc/passwd",
                      max_grad_norm=10.0)
    with caplog.at_level(logging.INFO, logger="client.policy"):
        applied = policy.apply(asked)
    assert (applied.test_fraction, applied.split_seed, applied.history_length) == (0.25, 7, 0)
    assert applied.precondition_corpus == "" and applied.max_grad_norm == 0.5
    assert applied.num_server_rounds == asked.num_server_rounds  # what is not pinned stays the run's
    assert "precondition-corpus" in caplog.text and "/etc/passwd" in caplog.text


def test_a_pinned_value_is_validated_like_the_run_config() -> None:
    policy = MerchantPolicy.from_node_config({"test-fraction": "2.0"})
    with pytest.raises(ValueError, match="test-fraction"):
        policy.apply(RunConfig())


def test_delta_must_be_small_next_to_one_over_the_units() -> None:
    assert delta_refusal(1e-5, 10_000) == ""
    assert "at most 1/(10·N)" in delta_refusal(1e-5, 10_001)
    assert "2000 privacy units" in delta_refusal(1e-4, 2000)
    assert delta_refusal(1e-4, 0) == ""


def test_a_deployed_node_uses_no_path_the_server_names() -> None:
    """precondition-corpus and feature-cache-dir name files on the merchant's machine: a
    deployed node (its node config names its data) ignores the run's and uses its own, if any."""
    asked = RunConfig(trainable="heads", precondition_corpus="/srv/shop/customers.txt",
                      feature_cache_dir="/tmp/anywhere")
    deployed = MerchantPolicy.from_node_config({"data-dir": "/srv/shop"}).apply(asked)
    assert (deployed.precondition_corpus, deployed.feature_cache_dir) == ("", "")
    own = MerchantPolicy.from_node_config({"data-dir": "/srv/shop", "precondition-corpus": "/srv/public.txt"})
    assert own.apply(asked).precondition_corpus == "/srv/public.txt"
    simulated = MerchantPolicy.from_node_config({"partition-id": 0}).apply(asked)  # the operator is every merchant
    assert simulated.precondition_corpus == "/srv/shop/customers.txt"


def test_timings_are_reported_only_where_the_merchant_says_so() -> None:
    """report-timings (the call's wall times, a timing side channel): a deployed node sends
    them only when its own node config says true, whatever the run asks; its false wins over
    a run asking true (no refusal: the reply simply carries none). In simulation the run decides."""
    asks = RunConfig(report_timings=True)
    assert RunConfig().report_timings is False  # off unless someone turns it on
    deployed = {"data-dir": "/srv/shop"}
    assert MerchantPolicy.from_node_config(deployed).apply(asks).report_timings is False
    assert MerchantPolicy.from_node_config({**deployed, "report-timings": False}).apply(asks).report_timings is False
    pinned = MerchantPolicy.from_node_config({**deployed, "report-timings": "true"})
    assert pinned.refusal(asks) == "" and pinned.apply(RunConfig()).report_timings is True
    simulated = MerchantPolicy.from_node_config({"partition-id": 0})
    assert simulated.apply(asks).report_timings is True and simulated.apply(RunConfig()).report_timings is False
