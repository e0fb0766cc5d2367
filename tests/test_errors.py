from crepa_mem.errors import (CrepaConfigError, CrepaMemError, DoesNotFitError, ProfileNotFoundError,
                              ShapeError)


def test_config_error_names_key_value_and_range_and_is_a_value_error():
    e = CrepaConfigError("crepa_adjacent_tau", 0, valid="> 0", hint="exp(-d/tau)")
    assert isinstance(e, ValueError) and isinstance(e, CrepaMemError) and e.exit_code == 2
    assert str(e) == "crepa_adjacent_tau=0 is invalid: valid is > 0 (exp(-d/tau))"
    assert (e.key, e.value, e.valid) == ("crepa_adjacent_tau", 0, "> 0")


def test_profile_not_found_suggests_close_names():
    e = ProfileNotFoundError("GPU", "rtx4900", ["rtx4090", "rtx3090", "h100"])
    assert isinstance(e, LookupError) and e.exit_code == 2
    assert "did you mean rtx4090" in str(e) and not str(e).startswith("'")


def test_exit_codes():
    assert DoesNotFitError("x").exit_code == 3 and ShapeError("x").exit_code == 2 and CrepaMemError("x").exit_code == 1
