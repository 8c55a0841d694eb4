import pytest

from kmd.editors.protocol import EditRequest, InvalidRequestError
from kmd.editors.registry import UnknownBackendError, backend_names, get_backend, register_backend


def test_unknown_backend_suggests_near_names():
    with pytest.raises(UnknownBackendError, match="did you mean grace"):
        get_backend("grase")


def test_registration_is_strict():
    with pytest.raises(ValueError, match="already registered"):
        register_backend("grace", "x:y")
    with pytest.raises(ValueError, match="lowercase"):
        register_backend("Bad-Name", "x:y")
    assert "grace" in backend_names()


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"prompt": "", "target": "x"}, "prompt must be"),
        ({"prompt": "p", "target": "  "}, "target must be"),
        ({"prompt": "p" * 5000, "target": "x"}, "limit"),
        ({"prompt": "p", "target": "x", "rephrases": [""]}, "rephrases"),
        ({"prompt": "p", "target": "x", "subject": ""}, "subject"),
    ],
)
def test_bad_requests_are_refused_with_a_reason(fields, message):
    with pytest.raises(InvalidRequestError, match=message):
        EditRequest(**fields).validate()


def test_request_round_trips_and_rejects_unknown_fields():
    request = EditRequest(prompt="p", target="t", rephrases=["a"], subject="s")
    assert EditRequest.from_dict(request.to_dict()) == request
    with pytest.raises(InvalidRequestError, match="unknown"):
        EditRequest.from_dict({"prompt": "p", "target": "t", "extra": 1})


def test_apply_refuses_invalid_request_and_keeps_nothing(tiny_host):
    editor = get_backend("grace")(tiny_host)
    with pytest.raises(InvalidRequestError):
        editor.apply(EditRequest(prompt="", target="x"))
    assert editor.edit_ids == []


def test_missing_model_is_a_clear_error_without_network():
    from kmd.editors.model import ModelHost, ModelNotFoundError, ModelSettings

    with pytest.raises(ModelNotFoundError, match="offline mode"):
        ModelHost.load(ModelSettings(model="no-such-org/no-such-model", offline=True))
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        ModelHost.load(ModelSettings(model="/no/such/dir", offline=True))
