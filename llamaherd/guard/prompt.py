"""The Llama Guard prompt: each release's official chat template restated as code over token ids.

Sources, one per release (the chat_template field of each release's tokenizer_config.json on the Hugging Face
hub, as also embedded in the GGUF files built from them):
- Llama Guard 3 8B: https://huggingface.co/meta-llama/Llama-Guard-3-8B/blob/main/tokenizer_config.json
  The category list S1..S14 is one literal string (custom lists are not template variables there), the
  whole prompt string starts with a space before <|begin_of_text|>, and content is a plain string.
- Llama Guard 3 1B and 3 11B Vision: https://huggingface.co/meta-llama/Llama-Guard-3-1B/blob/main/
  tokenizer_config.json and .../Llama-Guard-3-11B-Vision/...: `categories` (default S1..S13) and
  `excluded_category_keys` are template variables, content is a list of typed parts, an image part puts
  "<|image|> " before the task line, and the last line has a space before <|eot_id|>.
- Llama Guard 4 12B: its chat template as rendered by transformers' processor from the hub checkpoint and
  published in huggingface/huggingface-llama-recipes, llama_guard/llama-guard-4.ipynb (commit a261779c; a
  text-only and an image conversation), and model card https://www.llama.com/docs/model-cards-and-prompt-
  formats/llama-guard-4/. Llama 4's header and end-of-turn tokens; "according to our safety policy"; the
  defaults are S1..S14, or S1..S13 when any message holds an image; "<BEGIN CONVERSATION>" is followed by one
  newline, and each turn is "User: " or "Agent: ", one <|image|> per image part, the text, then a literal
  backslash-n backslash-n (the template writes '\\n\\n') and two newlines; a space before <|eot|>. Custom
  `categories` and `excluded_category_keys` are template variables as in 3 1B. Text is trimmed and a turn's
  text parts are joined with nothing between them as in 3 1B; the published renderings (one text part, no
  surrounding space) cannot confirm either.
All end the prompt right after the assistant header (no "\n\n"): the model writes "\n\n" itself.

Roles: the role assessed is 'User' for an odd number of messages and 'Agent' for an even number; messages
must alternate user/assistant starting with user (the templates raise otherwise, and so do we).
Special-token literals inside message text stay plain text here (the tokenizer never turns text into control
tokens), where rendering the template to a string and tokenizing it would let a message inject them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from ..errors import LlamaherdError


class GuardError(LlamaherdError):
    """A conversation, category list or guard model that Llama Guard / Prompt Guard cannot work with."""


# The MLCommons hazard taxonomy names as the Llama Guard 3 templates spell them (all three templates agree).
LLAMA_GUARD_3_CATEGORIES: dict[str, str] = {
    "S1": "Violent Crimes.",
    "S2": "Non-Violent Crimes.",
    "S3": "Sex Crimes.",
    "S4": "Child Exploitation.",
    "S5": "Defamation.",
    "S6": "Specialized Advice.",
    "S7": "Privacy.",
    "S8": "Intellectual Property.",
    "S9": "Indiscriminate Weapons.",
    "S10": "Hate.",
    "S11": "Self-Harm.",
    "S12": "Sexual Content.",
    "S13": "Elections.",
    "S14": "Code Interpreter Abuse.",
}
_S1_S13 = {k: v for k, v in LLAMA_GUARD_3_CATEGORIES.items() if k != "S14"}

TASK = ("Task: Check if there is unsafe content in '{role}' messages in conversations according{to} our safety "
        "policy with the below categories.\n\n")
INSTRUCTION = ("Provide your safety assessment for ONLY THE LAST {role} message in the above conversation:\n"
               " - First line must read 'safe' or 'unsafe'.\n"
               " - If unsafe, a second line must include a comma-separated list of violated categories.")


@dataclass(frozen=True)
class Release:
    """What differs between the official templates of the Llama Guard releases."""

    name: str
    default_categories: Mapping[str, str]
    leading_space: bool  # 3 8B: the template's string literal starts with " <|begin_of_text|>"
    space_before_eot: bool  # 3 1B / 11B Vision: "... violated categories. <|eot_id|>"
    images: bool  # whether image parts are allowed (3 11B Vision: "<|image|> " precedes the task line)
    llama4: bool = False  # Llama Guard 4: Llama 4 tokens, "according to", images and text inside each turn
    image_categories: Mapping[str, str] | None = None  # the defaults when an image is present, if they differ

    @property
    def specials(self) -> tuple[str, str, str]:
        """(header start, header end, end of turn) of the release's tokenizer."""
        if self.llama4:
            return "<|header_start|>", "<|header_end|>", "<|eot|>"
        return "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"


RELEASES: dict[str, Release] = {
    "llama-guard-3-8b": Release("llama-guard-3-8b", LLAMA_GUARD_3_CATEGORIES, True, False, False),
    "llama-guard-3-1b": Release("llama-guard-3-1b", _S1_S13, False, True, False),
    "llama-guard-3-11b-vision": Release("llama-guard-3-11b-vision", _S1_S13, False, True, True),
    "llama-guard-4-12b": Release("llama-guard-4-12b", LLAMA_GUARD_3_CATEGORIES, False, True, True, llama4=True,
                                 image_categories=_S1_S13),
}


def release(name: str) -> Release:
    try:
        return RELEASES[name.lower()]
    except KeyError:
        raise GuardError(f"unknown Llama Guard release {name!r}; known: {', '.join(RELEASES)}") from None


def _parts(message: Mapping, index: int) -> list[dict]:
    """A message's content as typed parts (a plain string is one text part)."""
    content = message.get("content")
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if isinstance(content, list) and all(isinstance(p, Mapping) for p in content):
        return [dict(p) for p in content]
    raise GuardError(f"message {index}: content must be a string or a list of parts "
                     f"({{'type': 'text', 'text': ...}}), got {type(content).__name__}")


def check_conversation(messages: Sequence[Mapping]) -> None:
    """The templates' rule: at least one message, roles alternating user/assistant starting with user."""
    if not isinstance(messages, Sequence) or isinstance(messages, (str, bytes)) or not messages:
        raise GuardError("messages: give a non-empty list of {'role': 'user'|'assistant', 'content': ...} dicts")
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or m.get("role") not in ("user", "assistant"):
            role = m.get("role") if isinstance(m, Mapping) else type(m).__name__
            raise GuardError(f"message {i}: role {role!r} is not checked by Llama Guard; give only 'user' and "
                             "'assistant' messages (drop system and tool messages first)")
        if (m["role"] == "user") != (i % 2 == 0):
            raise GuardError("Conversation roles must alternate user/assistant/user/assistant/... "
                             f"(message {i} is {m['role']!r})")


def assessed_role(messages: Sequence[Mapping]) -> str:
    """'User' or 'Agent': whose last message the prompt asks about."""
    return "Agent" if len(messages) % 2 == 0 else "User"


def categories_for(rel: Release, categories: Mapping[str, str] | None = None,
                   excluded: Sequence[str] = (), has_image: bool = False) -> dict[str, str]:
    """The category lines the prompt lists: custom or the release's defaults, minus the excluded keys."""
    defaults = rel.image_categories if has_image and rel.image_categories is not None else rel.default_categories
    table = dict(defaults if categories is None else categories)
    if not table:
        raise GuardError("categories: give at least one category (code -> name), e.g. {'S1': 'Violent Crimes.'}")
    for key, text in table.items():
        if not isinstance(key, str) or not isinstance(text, str) or not key.strip() or ":" in key:
            raise GuardError(f"categories: {key!r}: codes and descriptions must be strings, codes without ':'")
    unknown = [k for k in excluded if k not in table]
    if unknown:
        raise GuardError(f"excluded categories {unknown} are not in the category list {list(table)}")
    kept = {k: v for k, v in table.items() if k not in set(excluded)}
    if not kept:
        raise GuardError("every category is excluded; leave at least one to check against")
    return kept


def render_segments(rel: Release, messages: Sequence[Mapping], categories: Mapping[str, str] | None = None,
                    excluded: Sequence[str] = ()) -> list[tuple[str, str]]:
    """The prompt as ('text', s) and ('special', literal) segments, in the templates' order."""
    check_conversation(messages)
    parts = [_parts(m, i) for i, m in enumerate(messages)]
    for ps in parts:
        if any(p.get("type") == "text" and not isinstance(p.get("text"), str) for p in ps):
            raise GuardError("a text part needs a string 'text' field")
    has_image = any(p.get("type") == "image" for ps in parts for p in ps)
    if has_image and not rel.images:
        raise GuardError(f"{rel.name} reads text only; use llama-guard-3-11b-vision or llama-guard-4-12b for images")
    kept = categories_for(rel, categories, excluded, has_image)
    role = assessed_role(messages)
    start, end, eot = rel.specials
    out: list[tuple[str, str]] = []
    if rel.leading_space:
        out.append(("text", " "))
    out += [("special", "<|begin_of_text|>"), ("special", start), ("text", "user"), ("special", end)]
    body = "\n\n"
    if has_image and not rel.llama4:  # Llama Guard 3 11B Vision: one image token before the task line
        out += [("text", body), ("special", "<|image|>")]
        body = " "
    body += TASK.format(role=role, to=" to" if rel.llama4 else "") + "<BEGIN UNSAFE CONTENT CATEGORIES>\n"
    body += "".join(f"{k}: {v}\n" for k, v in kept.items())
    body += "<END UNSAFE CONTENT CATEGORIES>\n\n<BEGIN CONVERSATION>\n" + ("" if rel.llama4 else "\n")
    for m, ps in zip(messages, parts):
        who = "User" if m["role"] == "user" else "Agent"
        texts = [p["text"].strip() for p in ps if p.get("type") == "text"]
        if not rel.llama4:
            body += "".join(f"{who}: {t}\n\n" for t in texts)
            continue
        # Llama Guard 4: the turn's images first, then its text, then the template's literal "\\n\\n".
        body += f"{who}: "
        for _ in range(sum(p.get("type") == "image" for p in ps)):
            out += [("text", body), ("special", "<|image|>")]
            body = ""
        body += "".join(texts) + "\\n\\n\n\n"
    body += "<END CONVERSATION>\n\n" + INSTRUCTION.format(role=role) + (" " if rel.space_before_eot else "")
    out += [("text", body), ("special", eot), ("special", start), ("text", "assistant"), ("special", end)]
    return out


def encode(tokenizer, rel: Release, messages: Sequence[Mapping], categories: Mapping[str, str] | None = None,
           excluded: Sequence[str] = ()) -> list[int]:
    """The prompt's token ids: text through the tokenizer, control tokens by id."""
    ids: list[int] = []
    for kind, s in render_segments(rel, messages, categories, excluded):
        ids += [tokenizer.special_id(s)] if kind == "special" else tokenizer.encode(s)
    return ids


def render_text(rel: Release, messages: Sequence[Mapping], categories: Mapping[str, str] | None = None,
                excluded: Sequence[str] = ()) -> str:
    """The prompt as one string (what `herd guard --show-prompt` prints)."""
    return "".join(s for _, s in render_segments(rel, messages, categories, excluded))
