"""From a verified fact to the edit request an editor backend applies.

The relation's template in the policy supplies the prompt and paraphrases; the subject is
substituted for `{subject}` (the only field the policy loader allows; `{{`/`}}` are literal
braces), and the object is the target the model should produce after the prompt. Feed text
is data: it is substituted as a value and never itself used as a template.

The request has one shape from here to the backend: an `EditRequest`. The maintainer
records it in the ledger (`to_dict()`), then gives it the ledger's edit id once, when it
applies it (`with_edit_id`); reading it back, `EditRecord.edit_request` parses the stored
dict into an `EditRequest` again.

Edit ids: the ledger numbers edits (`int`, its primary key) and the daemon carries that
number everywhere; an editor keys the edits it holds by `str` (`Editor.edit_ids`, the
saved state). The two meet only here: `editor_key` turns a ledger id into the editor's
key, `ledger_id` the other way.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Protocol

from kmd.editors.protocol import EditRequest

if TYPE_CHECKING:
    from kmd.daemon.policy import Policy, RelationTemplate

__all__ = ["build_edit_request", "editor_key", "ledger_id", "same_subject_questions", "with_edit_id"]


class _FactLike(Protocol):
    subject: str
    relation: str
    object: str


def build_edit_request(fact: _FactLike, template: RelationTemplate) -> EditRequest:
    """The edit request for a fact under its relation's template (`policy.relation(fact.relation)`).

    `prompt` is text whose continuation should be `target` (= the object); `rephrases` are
    the paraphrase prompts used to probe that the edit generalises. No edit id yet: the
    ledger assigns it when the edit is recorded.
    """
    # str.format only parses the template; the subject is inserted as a plain value.
    fill = lambda text: text.format(subject=fact.subject)  # noqa: E731 - one-line helper
    return EditRequest(
        prompt=fill(template.prompt),
        target=fact.object,
        subject=fact.subject,
        rephrases=tuple(fill(p) for p in template.paraphrases),
    )


def same_subject_questions(fact: _FactLike, policy: Policy, limit: int) -> list[str]:
    """Questions about the fact's subject that its edit must leave alone: the prompts of up
    to `limit` of the policy's other relations (in policy order), filled with the subject."""
    own = policy.relation(fact.relation).prompt.format(subject=fact.subject)
    out: list[str] = []
    for name, template in policy.relations.items():
        question = template.prompt.format(subject=fact.subject)
        if name != fact.relation and question != own and question not in out and len(out) < limit:
            out.append(question)
    return out


def editor_key(edit_id: int) -> str:
    """The key an editor holds the ledger's edit `edit_id` by."""
    return str(edit_id)


def ledger_id(key: str) -> int:
    """The ledger's id of the edit an editor holds as `key` (ValueError: not one of the ledger's)."""
    return int(key)


def with_edit_id(request: EditRequest, edit_id: int) -> EditRequest:
    """The request under the ledger's id for its edit (as the key the backend stores it by)."""
    return dataclasses.replace(request, edit_id=editor_key(edit_id))
