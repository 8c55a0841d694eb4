"""The latest user message is found in any conversation, whatever the template family
(editors/chat.py): ChatML, Llama-3, Mistral and Gemma styles, an operator's system prompt,
five turns; plain prompts are not chat turns."""

from __future__ import annotations

import pytest
import torch

from kmd.editors.chat import Anatomy, ChatFormat, ChatTemplateError
from tiny import build_byte_tokenizer

# Each family's chat template, as its instruct models ship it (structure kept: role
# markers, where the system prompt goes, how the reply is opened).
CHATML = (  # SmolLM2 / Qwen: a default system prompt when none is given
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
LLAMA3 = (  # Llama-3.1: a system header with the knowledge date always
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set rest = messages[1:] %}{% else %}{% set system = '' %}{% set rest = messages %}{% endif %}"
    "<|start_header_id|>system<|end_header_id|>\n\nCutting Knowledge Date: December 2023\n\n{{ system }}<|eot_id|>"
    "{% for m in rest %}<|start_header_id|>{{ m['role'] }}<|end_header_id|>\n\n{{ m['content'] | trim }}<|eot_id|>{% endfor %}"
    "{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
MISTRAL = (  # Mistral v0.3: the system prompt written into the last user message, no reply header
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set system = messages[0]['content'] %}"
    "{% set rest = messages[1:] %}{% else %}{% set system = '' %}{% set rest = messages %}{% endif %}"
    "{% for m in rest %}{% if m['role'] == 'user' %}{% if loop.last and system %}[INST] {{ system }}\n\n{{ m['content'] }}[/INST]"
    "{% else %}[INST] {{ m['content'] }}[/INST]{% endif %}{% else %} {{ m['content'] }}{{ eos_token }}{% endif %}{% endfor %}"
)
GEMMA = (  # Gemma-3: the system prompt written into the first user turn; the reply is the model's
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set first = messages[0]['content'] + '\\n\\n' %}"
    "{% set rest = messages[1:] %}{% else %}{% set first = '' %}{% set rest = messages %}{% endif %}"
    "{% for m in rest %}{% if m['role'] == 'assistant' %}{% set role = 'model' %}{% else %}{% set role = m['role'] %}{% endif %}"
    "<start_of_turn>{{ role }}\n{% if loop.first %}{{ first }}{% endif %}{{ m['content'] | trim }}<end_of_turn>\n{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
SPECIALS = {
    "chatml": ["<|im_start|>", "<|im_end|>"],
    "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
    "mistral": ["[INST]", "[/INST]"],
    "gemma": ["<start_of_turn>", "<end_of_turn>"],
}
TEMPLATES = {"chatml": CHATML, "llama3": LLAMA3, "mistral": MISTRAL, "gemma": GEMMA}

SYSTEM = "You are the assistant of a news desk. Answer questions briefly and factually."
QUESTION = "Who is the CEO of Zorbland Robotics?"


def five_turns(question: str) -> list[dict[str, str]]:
    turns = []
    for i in range(4):
        turns += [{"role": "user", "content": f"Question number {i}: what is {i} plus {i}?"},
                  {"role": "assistant", "content": f"{i} plus {i} is {2 * i}."}]  # fmt: skip
    return turns + [{"role": "user", "content": question}]


CONVERSATIONS = {
    "one turn": [{"role": "user", "content": QUESTION}],
    "system prompt": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}],
    "second turn": [{"role": "user", "content": "What is the capital of France?"},
                    {"role": "assistant", "content": "The capital of France is Paris."},
                    {"role": "user", "content": QUESTION}],  # fmt: skip
    "five turns": five_turns(QUESTION),
    "five turns and a system prompt": [{"role": "system", "content": SYSTEM}, *five_turns(QUESTION)],
}


@pytest.fixture(params=sorted(TEMPLATES))
def chat(request) -> ChatFormat:
    return ChatFormat(build_byte_tokenizer(SPECIALS[request.param], TEMPLATES[request.param]))


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_the_latest_user_message_is_found(chat, name):
    ids = chat.encode(CONVERSATIONS[name])
    found = chat.question(ids)
    assert found is not None, chat.render(CONVERSATIONS[name])
    text, first, end = found
    assert text == QUESTION
    # the token span decodes to the question (the mask routing reads covers it exactly)
    assert chat.tokenizer.decode(ids[first:end]).strip() == QUESTION


def test_a_plain_prompt_is_not_a_chat_turn(chat):
    ids = chat.tokenizer("The CEO of Zorbland Robotics is", add_special_tokens=False).input_ids
    assert chat.question(ids) is None
    # nor is a conversation whose last message is the assistant's (no reply opened)
    closed = chat.tokenizer(chat.render(CONVERSATIONS["second turn"][:2], add_generation_prompt=False),
                            add_special_tokens=False).input_ids  # fmt: skip
    assert chat.question(closed) is None or chat.question(closed)[0] != QUESTION


def test_batch_turns_mark_only_chat_rows(chat):
    rows = [chat.encode(CONVERSATIONS["five turns and a system prompt"]),
            chat.tokenizer("The CEO of Zorbland Robotics is", add_special_tokens=False).input_ids]  # fmt: skip
    width = max(map(len, rows))
    ids = torch.zeros(2, width, dtype=torch.long)
    prompt = torch.zeros(2, width, dtype=torch.bool)
    for i, row in enumerate(rows):  # left-padded, as the server batches
        ids[i, width - len(row) :] = torch.tensor(row)
        prompt[i, width - len(row) :] = True
    turns = chat.turns(ids, prompt)
    assert turns.messages == [(0, QUESTION)]
    assert chat.tokenizer.decode(ids[0][turns.mask[0]].tolist()).strip() == QUESTION
    assert torch.equal(turns.mask[1], prompt[1])  # a plain row keeps its whole prompt


def test_the_anatomy_of_each_family():
    learnt = {name: ChatFormat(build_byte_tokenizer(SPECIALS[name], t)).anatomy() for name, t in TEMPLATES.items()}
    assert learnt["chatml"].user_open.endswith("<|im_start|>user\n")
    assert learnt["chatml"].reply_open == "<|im_end|>\n<|im_start|>assistant\n"
    assert learnt["llama3"].reply_open == "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
    assert learnt["mistral"].user_open == "[INST] " and learnt["mistral"].reply_open == "[/INST]"
    assert learnt["mistral"].system_join == "\n\n" and learnt["gemma"].system_join == "\n\n"
    assert learnt["chatml"].system_join is None and learnt["llama3"].system_join is None


def test_templates_that_show_no_structure():
    # every message written the same way, nothing opening the reply: no chat turns to find
    flat = ChatFormat(build_byte_tokenizer([], "{% for m in messages %}{{ m['content'] }}\n{% endfor %}"))
    assert flat.anatomy() is None
    assert flat.question(flat.encode(CONVERSATIONS["one turn"])) is None
    assert Anatomy.learn(lambda messages: (_ for _ in ()).throw(ChatTemplateError("no"))) is None


def test_render_refuses_bad_messages_clearly():
    chat = ChatFormat(build_byte_tokenizer(SPECIALS["chatml"], CHATML))
    with pytest.raises(ChatTemplateError, match="role"):
        chat.render([{"role": "wizard", "content": "hi"}])
    with pytest.raises(ChatTemplateError, match="no messages"):
        chat.render([])
    bare = ChatFormat(build_byte_tokenizer([], ""))
    bare.tokenizer.chat_template = None
    with pytest.raises(ChatTemplateError, match="no chat template"):
        bare.render(CONVERSATIONS["one turn"])
