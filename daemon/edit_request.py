"""From a verified fact to the edit request an editor backend applies.

The relation's template in the policy supplies the prompt and paraphrases; the subject is
substituted for `{subject}` (the only field the policy loader allows; `{{`/`}}` are literal braces), and the object
is the target the model should produce after the prompt. Feed text is data: it is
substituted as a value and never itself used as a template.
"""

from __future__ import annotations

from typing import Any, Protocol

from kmd.daemon.policy import Policy

__all__ = ["build_edit_request"]


class _FactLike(Protocol):
    subject: str
    relation: str
    object: str


def build_edit_request(fact: _FactLike, policy: Policy) -> dict[str, Any]:
    """The edit request for a fact: keys `prompt`, `target`, `subject`, `rephrases`.

    `prompt` is text whose continuation should be `target` (= the object); `rephrases` are
    the paraphrase prompts used to probe that the edit generalises. Raises KeyError if the
    policy has no template for the fact's relation.
    """
    template = policy.relation(fact.relation)
    # str.format only parses the template; the subject is inserted as a plain value.
    fill = lambda text: text.format(subject=fact.subject)  # noqa: E731 - one-line helper
    return {
        "prompt": fill(template.prompt),
        "target": fact.object,
        "subject": fact.subject,
        "rephrases": [fill(p) for p in template.paraphrases],
    }
