"""A chat template rendered once per conversation shape, then filled with each record's texts.

Most records of a file have the same shape (the roles of their messages and the types of their parts: a user
turn with an image and a text, an assistant turn with a text). Where the template reads a part's text only to write
it as it is, the rendered conversation is the same for every record of a shape but for those texts, so rendering the
shape once, with markers for the texts, and putting each record's texts in their places gives the template's text
without running it per record (a fifth of the first data check of a large file was the template).

Where that holds is checked before use, and a template that fails a check is run per record as before:

- **Statically** (``writes_text_verbatim``): in the template's syntax tree, a part's text (``part['text']``,
  ``part.text``) is only ever written out as it is (``{{ part['text'] }}``: no filter, test, comparison, method,
  assignment or concatenation), and a message's ``content`` is only written out, tested (``is string``) or looped
  over. A template that looks into the text (Qwen3's ``'</think>' in content``, ``content.split(...)``,
  ``|trim``) is not filled.
- **Per shape** (``Skeleton``): the shape is rendered with markers, then with other texts (quotes, backslashes,
  newlines, spaces at both ends, tags, braces, non-ASCII); each marker must appear once, in order, and the second
  rendering must be the skeleton filled with the second texts, character for character.
"""

from __future__ import annotations

from collections.abc import Callable

_MARK = "\x00vlmtune-text-{}\x00"
_PROBE = " \"quoted' \\back\\slash\n<tag></think>{{ brace }} é\u00a0\t{} "


def shape_of(conversation: list[dict]) -> tuple | None:
    """The shape of a conversation (roles and part types; None where it is not list-of-parts messages)."""
    shape = []
    for message in conversation:
        content = message.get("content")
        if not isinstance(content, list) or set(message) != {"role", "content"}:
            return None
        types = []
        for part in content:
            if part.get("type") == "text" and set(part) == {"type", "text"} and isinstance(part["text"], str):
                types.append("text")
            elif set(part) == {"type"}:
                types.append(part["type"])
            else:
                return None
        shape.append((message["role"], tuple(types)))
    return tuple(shape)


def texts_of(conversation: list[dict]) -> list[str]:
    """The texts of a conversation's parts, in order."""
    return [part["text"] for message in conversation for part in message["content"] if part.get("type") == "text"]


def _with_texts(shape: tuple, texts: list[str]) -> list[dict]:
    out, it = [], iter(texts)
    for role, types in shape:
        out.append({"role": role, "content": [{"type": "text", "text": next(it)} if t == "text" else {"type": t}
                                               for t in types]})
    return out


def writes_text_verbatim(environment, source: str) -> bool:
    """Whether the template only writes parts' texts as they are (see the module docstring)."""
    from jinja2 import nodes

    try:
        tree = environment.parse(source)
    except Exception:  # noqa: BLE001 (a template jinja cannot parse is not filled)
        return False

    def key(node) -> str | None:
        if isinstance(node, nodes.Getitem) and isinstance(node.arg, nodes.Const):
            return node.arg.value
        if isinstance(node, nodes.Getattr):
            return node.attr
        return None

    def ok(node, parent) -> bool:
        name = key(node)
        if name == "text" and not isinstance(parent, nodes.Output):
            return False
        if name == "content":
            allowed = isinstance(parent, nodes.Output) or (isinstance(parent, nodes.Test) and parent.name == "string")
            if not (allowed or (isinstance(parent, nodes.For) and parent.iter is node)):
                return False
        return all(ok(child, node) for child in node.iter_child_nodes())

    return ok(tree, None)


class Skeleton:
    """A shape's rendered text cut at its texts: ``segments[0] + texts[0] + segments[1] + ... + segments[-1]``."""

    def __init__(self, segments: list[str]):
        self.segments = segments

    def fill(self, texts: list[str]) -> str:
        out = [self.segments[0]]
        for text, segment in zip(texts, self.segments[1:]):
            out += [text, segment]
        return "".join(out)

    @classmethod
    def build(cls, shape: tuple, render: Callable[[list[dict]], str]) -> Skeleton | None:
        """The skeleton of a shape, or None where the checks of the module docstring fail."""
        n = sum(t == "text" for _, types in shape for t in types)
        marks = [_MARK.format(i) for i in range(n)]
        text = render(_with_texts(shape, marks))
        segments, pos = [], 0
        for mark in marks:
            at = text.find(mark, pos)
            if at < 0 or text.count(mark) != 1:
                return None
            segments.append(text[pos:at])
            pos = at + len(mark)
        segments.append(text[pos:])
        if any("\x00vlmtune-text-" in segment for segment in segments):
            return None
        skeleton = cls(segments)
        probes = [f"{_PROBE}{i}{_PROBE}" for i in range(n)]
        if render(_with_texts(shape, probes)) != skeleton.fill(probes):
            return None
        return skeleton
