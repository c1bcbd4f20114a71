"""Numbers in requests: NaN, infinities and negatives are no timeouts."""

import math

import pytest

from vdsm_blockops.core.errors import BadRequest
from vdsm_blockops.engine.context import check_timeout
from vdsm_blockops.shells.parser import parse_args


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf, -1, 0, "3"])
def test_check_timeout_refuses_what_is_no_timeout(value):
    with pytest.raises(BadRequest, match="timeout"):
        check_timeout(value)


def test_good_timeouts_pass():
    check_timeout(None)
    check_timeout(0.5)
    assert parse_args(["merge", "vm", "vda", "--timeout", "2.5"]).timeout == 2.5


@pytest.mark.parametrize("verb", [["merge", "vm", "vda"], ["relocate", "vm", "vda", "/x"],
                                  ["recover", "vm"]])
@pytest.mark.parametrize("value", ["nan", "inf", "-1", "0"])
def test_the_command_refuses_them_before_anything_runs(verb, value):
    with pytest.raises(BadRequest, match="timeout"):
        parse_args([*verb, "--timeout", value])
