"""Hypothesis settings profiles for the reliability property tests.

    GRNG_HYPOTHESIS_PROFILE=ci    (default) a few hundred cases per property, derandomized
    GRNG_HYPOTHESIS_PROFILE=full  >= 10,000 cases over all properties (see FAILURE_BEHAVIOUR.md)
    GRNG_HYPOTHESIS_PROFILE=dev   a handful per test, for editing the tests

`settings_for_tests()` returns the chosen profile; the property tests apply it as a decorator,
so selecting it here leaves every other test's Hypothesis settings untouched.
"""

from __future__ import annotations

import os

from hypothesis import HealthCheck, settings

PROFILE_ENV = "GRNG_HYPOTHESIS_PROFILE"
# Property test items in tests/test_properties.py: 3 properties x 9 optimizer x
# structure pairs = 27 items. ci: 30 each = 270 cases per property (810 in all); full: 400
# each = 3,600 per property, 10,800 in all.
EXAMPLES = {"dev": 3, "ci": 30, "full": 400}

_common = dict(deadline=None, print_blob=True,
               suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                      HealthCheck.filter_too_much])
settings.register_profile("grng-dev", max_examples=EXAMPLES["dev"], database=None, **_common)
settings.register_profile("grng-ci", max_examples=EXAMPLES["ci"], derandomize=True,
                          database=None, **_common)
settings.register_profile("grng-full", max_examples=EXAMPLES["full"], **_common)


def profile_name() -> str:
    name = os.environ.get(PROFILE_ENV, "ci")
    if name not in EXAMPLES:
        raise ValueError(f"{PROFILE_ENV}={name!r}: allowed one of {', '.join(EXAMPLES)}")
    return name


def settings_for_tests() -> settings:
    return settings(settings.get_profile(f"grng-{profile_name()}"))
