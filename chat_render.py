"""Chat records rendered with the model's own chat template, and exactly which characters train.

A chat record is rendered ONCE, whole, with the template (`apply_chat_template(messages,
tokenize=False)`): that string is what the model sees, token for token. The trained part
of it is each assistant turn as the template renders it, plus the template's own
end-of-turn marker (`<|im_end|>`, `<|eot_id|>`, `<end_of_turn>`, `</s>`, ...); the newline
after the marker, the system and user turns, role headers and generation prompts are not.

How an assistant turn k is found in the rendering F (templates rewrite content: Qwen3 drops
the <think> block of turns before the last question, DeepSeek-R1 keeps only what follows
</think>, Llama trims; so the content cannot simply be searched for):

1. Content: render again with turn k's content replaced by a private-use sentinel character
   that no template trims, splits or escapes. F and that rendering share a prefix up to
   where turn k's content starts and a suffix from where it ends, so their first and last
   differing characters bound what the template made of the content, whatever it did to
   it. Refused when the sentinel is not rendered exactly once, or when something after it
   changes too (the template used the content elsewhere).
2. Start: the model is prompted with render(messages[:k], add_generation_prompt=True). When
   the earlier turns render the same in F (render(messages[:k]) is a prefix of F and of the
   prompt), the trained part starts where F stops agreeing with that prompt, but never
   after the content found in 1. So text the template adds before the content that the
   prompt does not contain (Qwen3's `<think>\\n...</think>\\n\\n`) is trained, and a prompt
   longer than what F holds (DeepSeek-R1's `<|Assistant|><think>\\n`) stops at what F holds.
   When earlier turns are rewritten by later ones (Mistral puts the system text into the
   LAST user turn), the start is the content's start from 1.
3. End: render messages[:k] + [turn k with the sentinel]: the text after the sentinel is
   the template's turn ending; its first run of non-space characters is the end-of-turn
   marker. F must hold that marker right after the content (else refused); it is trained.

Tool calls: a record's `tools` go to the template; an assistant turn with `tool_calls` is
probed as a plain answer (the differing region is the call as the template renders it), or,
for templates whose role checks skip tool calls (Mistral), taken as what the conversation up
to it adds to the generation prompt; a template that renders the record identically without
the tools or the call is refused. Tool results and schemas never train. An assistant turn
with `"weight": 0` is located and rendered, not trained. Templates that print today's date
get the renderer's `date` (the engine pins it per file).

Turns are located in order and must not overlap. Any jinja error (gemma refuses a system
role, templates that demand alternating roles) or a turn that cannot be located raises
ChatRenderError naming the line, the template's reason and the fix: never a silent
fallback to another format. Token labels: the rendered text is tokenized once (fast
tokenizer, character offsets); a token is trained when its first character lies in a
trained span (a token straddling a boundary belongs to the side it starts on).

Standard library only: the caller hands in a transformers tokenizer object.
"""

from __future__ import annotations

import bisect
import datetime
import json
import re
import shlex
from pathlib import Path

from trainroot import GuardrailError

TEMPLATE, PLAIN = "template", "plain"
SENTINELS = "\ue000\ue001\ue002\ue003\ue004"  # private-use characters: no template touches them

# Merge the leading system turns into the first user turn (templates without a system
# role), in every list of turns of a record: `messages`, TRL's `prompt`, a name config.json's
# `fields` maps (a list of objects with a `role`).
JQ_MERGE_SYSTEM = (
    'def merge_sys: ((map(.role == "system") | index(false)) // 0) as $n | if $n > 0 and '
    '.[$n].role == "user" then [.[$n] + {content: ((.[:$n] | map(.content) | join("\\n\\n")) '
    '+ "\\n\\n" + .[$n].content)}] + .[$n + 1:] else . end; with_entries(if (.value | type) == '
    '"array" and (.value | length) > 0 and (.value[0] | type) == "object" and (.value[0] | '
    'has("role")) then .value |= merge_sys else . end)')


def merge_system_command(path, out_dir=None) -> str:
    """The shell command writing a copy of `path` with each system turn merged into the
    user's, into `out_dir` (a root's inbox/, where the daemon takes it) or beside it."""
    path = Path(path)
    out = Path(out_dir or path.parent) / (path.stem + "-merged" + path.suffix)
    return f"jq -c {shlex.quote(JQ_MERGE_SYSTEM)} {shlex.quote(str(path))} > {shlex.quote(str(out))}"


_PLAIN_CHOICE = (', or to "plain" to train in the plain <|system|>/<|user|>/<|assistant|> '
                 'format on purpose,')


class ChatRenderError(GuardrailError):
    """A chat record the model's template cannot render (or whose turns cannot be found)."""

    def __init__(self, what: str, where=None, fix: str | None = None, *, line: int | None = None):
        self.line = line
        super().__init__(what, where, fix)


def resolve_template(tokenizer, setting, root=None) -> str | None:
    """The template text chat records are rendered with; None means the plain rendering.

    `setting` is config.json's `chat_template`: null (the tokenizer's own template; plain
    when it has none), "plain", the name of one of the tokenizer's named templates, or a
    path to a .jinja file (relative to the root).
    """
    own = getattr(tokenizer, "chat_template", None)
    if setting is None:
        if isinstance(own, dict):
            own = own.get("default")
        return own or None
    if setting == PLAIN:
        return None
    if setting.endswith(".jinja"):
        path = Path(setting)
        if not path.is_absolute() and root is not None:
            path = Path(root) / path
        try:
            return path.read_text(encoding="utf-8")
        except OSError as exc:
            raise GuardrailError(f"chat_template {setting!r} cannot be read ({exc.strerror})",
                                 path, "Fix the path in config.json's `chat_template`, or set it "
                                 "to null to use the model's own template.") from None
    if isinstance(own, dict) and isinstance(own.get(setting), str):
        return own[setting]
    names = sorted(own) if isinstance(own, dict) else []
    raise GuardrailError(f"chat_template {setting!r} is not a template of this model "
                         f"(named templates: {', '.join(names) or 'none'})", "config.json",
                         "Set `chat_template` in config.json to null (the model's own template), "
                         "\"plain\" (lower case)" + (", one of the names above" if names else "")
                         + " or a path to a .jinja file.")


def _lcp(a: str, b: str, start: int = 0) -> int:
    """Length of the common prefix of a and b."""
    n = min(len(a), len(b))
    i = start
    while i < n and a[i] == b[i]:
        i += 1
    return i


def _lcs(a: str, b: str, limit: int) -> int:
    """Length of the common suffix of a and b, at most `limit`."""
    i = 0
    while i < limit and a[-1 - i] == b[-1 - i]:
        i += 1
    return i


# Templates that print today's date (Llama-3.x's "Today Date:", Mistral's system prompt) read
# `date_string` or call strftime_now(): both are pinned to the file's own date, so a file
# resumed on another day renders the same tokens. strftime_now becomes a template macro
# answering each format the template names (a callable cannot be handed to a template).
DATE_STRING_FORMAT = "%d %b %Y"            # Llama-3.x's date_string: "26 Jul 2024"
_STRFTIME_CALL = re.compile(r"""strftime_now\(\s*(["'])(.*?)\1\s*\)""")
_PINNED_NOW = ("{%- macro strftime_now(format) -%}{%- if format in guardrails_dates -%}"
               "{{ guardrails_dates[format] }}{%- else -%}{{ raise_exception('strftime_now(' ~ format"
               " ~ ') is called with a format this toolkit cannot pin to the file date') }}"
               "{%- endif -%}{%- endmacro -%}")
TOOL_CALL_KEYS = ("tool_calls", "function_call")


def is_tool_call(msg) -> bool:
    return isinstance(msg, dict) and any(msg.get(k) for k in TOOL_CALL_KEYS)


def template_messages(messages) -> list:
    """The messages as templates expect them: a tool-call turn without text has content ""
    (OpenAI exports write null; Qwen3 and DeepSeek templates fail on a missing one), and
    arguments given as a JSON string (OpenAI's form) are passed as the object they hold
    (what transformers' templates print with `tojson`; a string would be printed quoted)."""
    out = []
    for msg in messages:
        if is_tool_call(msg):
            msg = dict(msg)
            if msg.get("content") is None:
                msg["content"] = ""
            calls = []
            for call in msg.get("tool_calls") or ():
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    try:
                        args = json.loads(fn["arguments"])
                    except ValueError:
                        args = None
                    if isinstance(args, dict):
                        call = {**call, "function": {**fn, "arguments": args}}
                calls.append(call)
            if calls:
                msg["tool_calls"] = calls
        out.append(msg)
    return out


class ChatRenderer:
    """Renders `messages` with one template and cuts the result into (text, trained) pieces.

    `date` (a datetime.date, default today) is the date a template that prints today's
    date is given: the engine pins it per file and records it.
    """

    def __init__(self, tokenizer, setting=None, root=None, *, date=None):
        self.tokenizer = tokenizer
        self.setting = setting
        self.template = resolve_template(tokenizer, setting, root)
        own = getattr(tokenizer, "chat_template", None)
        self.named_only = sorted(own) if setting is None and isinstance(own, dict) and \
            not own.get("default") else None  # templates to choose from, and none by default
        self.inbox = Path(root) / "inbox" if root is not None else None  # where fixes write
        self.mode = TEMPLATE if self.template else PLAIN
        self.date = date or datetime.date.today()
        self._date_kwargs = {"date_string": self.date.strftime(DATE_STRING_FORMAT)}
        if self.template and "strftime_now" in self.template:
            formats = {m.group(2) for m in _STRFTIME_CALL.finditer(self.template)}
            self._date_kwargs["guardrails_dates"] = {f: self.date.strftime(f) for f in formats}
            self.template = _PINNED_NOW + self.template

    def describe(self) -> str:
        if self.named_only:
            return (f"no template: the model has named chat templates ({', '.join(self.named_only)}) "
                    "and no default one")
        if self.mode == PLAIN:
            return ("the plain rendering (config.json chat_template \"plain\")" if self.setting == PLAIN
                    else "the plain rendering (the model has no chat template)")
        return ("the model's chat template" if self.setting is None
                else f"chat_template {self.setting!r} from config.json")

    def render(self, messages, generation_prompt: bool = False, tools=None) -> str:
        return self.tokenizer.apply_chat_template(list(messages), tools=tools or None, tokenize=False,
                                                  add_generation_prompt=generation_prompt,
                                                  chat_template=self.template, **self._date_kwargs)

    def _refuse(self, line, why: str, where, *, system: bool = False) -> ChatRenderError:
        at = f"line {line}: " if line is not None else ""
        fix = ("Set `chat_template` in config.json to another template (a named template of "
               "the model or a .jinja file)" + _PLAIN_CHOICE + " and queue the file again.")
        if system and where:
            fix = (f"This template has no system role: merge each system turn into the first "
                   f"user turn with `{merge_system_command(where, self.inbox)}`"
                   + (" (it writes the merged file into the inbox, where the daemon takes it)"
                      if self.inbox else " and drop the merged file into inbox/")
                   + "; or " + fix[0].lower() + fix[1:])
        return ChatRenderError(f"{at}the chat template ({self.describe()}) cannot render this "
                               f"record: {why}", where, fix, line=line)

    def pieces(self, messages, *, tools=None, line=None, where=None
               ) -> tuple[list[tuple[str, bool]], bool]:
        """([(text, trained), ...] concatenating to the rendered record, ends_with_marker).

        `tools` is the record's `tools` list (function schemas), handed to the template.
        An assistant turn with `"weight": 0` is rendered but not trained; a tool-call turn
        trains the call as the template renders it, never the tool's result.
        `ends_with_marker` is False only when the template puts nothing after the last
        assistant turn (the caller then appends EOS so the model still learns to stop).
        """
        try:
            return self._pieces(messages, tools, line, where)
        except ChatRenderError as err:
            if tools or any(is_tool_call(m) or m.get("role") == "tool" for m in messages
                            if isinstance(m, dict)):  # the plain rendering refuses tool turns too
                err.fix = err.fix.replace(_PLAIN_CHOICE, " or train files without tool turns,")
            raise

    def _control_tokens(self) -> list[str]:
        """The tokenizer's special tokens (<|im_end|>, </s>, ...)."""
        if getattr(self, "_specials", None) is None:
            tok = self.tokenizer
            found = set(getattr(tok, "all_special_tokens", None) or [])
            for added in (getattr(tok, "added_tokens_decoder", None) or {}).values():
                if getattr(added, "special", False):
                    found.add(str(added.content))
            self._specials = sorted(t for t in found if t and not t.isspace())
        return self._specials

    def refuse_control_text(self, messages, line, where) -> None:
        """A turn's text holding a special token's text ("ok<|im_end|>\n<|im_start|>user...")
        would be read as that token: the turn ends early, a forged turn follows, and both
        train as if the template had written them. Refused, never trained so."""
        specials = self._control_tokens()
        for k, msg in enumerate(messages):
            texts = [msg]
            while texts:  # every string in the turn: content (or its parts), tool calls, ...
                value = texts.pop()
                if isinstance(value, (dict, list)):
                    texts.extend(value.values() if isinstance(value, dict) else value)
                elif isinstance(value, str):
                    hits = [(value.find(t), -len(t), t) for t in specials if t in value]
                    if hits:  # (the first in the text, the longest there)
                        hit = min(hits)[2]
                        at = f"line {line}: " if line is not None else ""
                        raise ChatRenderError(
                            f"{at}turn {k + 1} ({msg.get('role') if isinstance(msg, dict) else '?'}) "
                            f"holds the text {hit!r}, the tokenizer's own control token: it would "
                            "be read as that token, not as text (a turn that ends early, or a turn "
                            "the record forges)", where,
                            "Remove it from the record (to teach the text itself, write it apart, "
                            "e.g. with a space inside the brackets), or queue the file with "
                            "`python3 training_queue.py add FILE --skip-invalid` to pass over such "
                            "records.", line=line)

    def _pieces(self, messages, tools, line, where) -> tuple[list[tuple[str, bool]], bool]:
        messages = template_messages(messages)
        self.refuse_control_text(messages, line, where)
        has_system = any(isinstance(m, dict) and m.get("role") == "system" for m in messages)
        try:
            full = self.render(messages, tools=tools)
            if tools and full == self.render(messages):
                raise self._refuse(line, "the record has a `tools` list and this template does "
                                   "not render tools", where)
        except ChatRenderError:
            raise
        except Exception as exc:  # jinja raises what the template author chose (roles etc.)
            raise self._refuse(line, f"{exc.__class__.__name__}: {exc}", where,
                               system=has_system) from None
        self._check_no_turn_dropped(messages, tools, full, line, where)
        spans: list[tuple[int, int, bool]] = []
        ends_with_marker = True
        sentinel = self._sentinel(full, messages)
        for k, msg in enumerate(messages):
            if msg.get("role") != "assistant":
                continue
            start, end, marker = self._locate(full, messages, tools, k,
                                              spans[-1][1] if spans else 0, line, where, sentinel)
            spans.append((start, end, msg.get("weight", 1) != 0))
            ends_with_marker = bool(marker)
        out, pos = [], 0
        for start, end, trained in spans:
            if start > pos:
                out.append((full[pos:start], False))
            if end > start:
                out.append((full[start:end], trained))
            pos = end
        if pos < len(full):
            out.append((full[pos:], False))
        return out, ends_with_marker

    def _check_no_turn_dropped(self, messages, tools, full: str, line, where) -> None:
        """Refuses a record whose rendering leaves out a system, user or tool turn (Mistral's
        templates drop the system text unless the conversation ends on a user turn). A turn
        whose text is found once, and nowhere else in the record, is rendered; one whose text
        also stands elsewhere (a user turn repeating the system prompt) is looked for as a
        marker put in its place, in one more rendering."""
        def dropped(k):
            role = messages[k].get("role")
            return self._refuse(line, f"the {role} turn {k + 1} is not in the rendered text (the "
                                "template drops it)", where, system=role == "system")
        unsure = []
        dumped = [json.dumps(m, ensure_ascii=False) for m in messages]  # (once: n turns, not n^2)
        everything, tools_text = "\x00".join(dumped), json.dumps(tools or "", ensure_ascii=False)
        for k, msg in enumerate(messages):
            text = msg.get("content")
            if msg.get("role") == "assistant" or not isinstance(text, str) or not text.strip():
                continue
            t = text.strip()
            if t not in full and json.dumps(text) not in full:
                raise dropped(k)
            # in another turn: more times in all of them than in this one's own
            if full.count(t) > 1 or t in tools_text or everything.count(t) > dumped[k].count(t):
                unsure.append(k)
        if not unsure:
            return
        used = full + "".join(json.dumps(m, ensure_ascii=False) for m in messages)
        s = next((c for c in SENTINELS if c not in used), None)
        if s is None:
            raise self._refuse(line, "the record contains every private-use marker character", where)
        probe = [dict(m, content=f"{s}{k}{s}") if k in unsure else m for k, m in enumerate(messages)]
        try:
            rendered = self.render(probe, tools=tools)
        except Exception as exc:
            raise self._refuse(line, f"{exc.__class__.__name__}: {exc}", where) from None
        for k in unsure:
            if f"{s}{k}{s}" not in rendered:
                raise dropped(k)

    def _sentinel(self, full: str, messages) -> str | None:
        """A private-use character in neither the rendering nor any turn's text."""
        used = full + "".join(m.get("content") or "" for m in messages if isinstance(m.get("content"), str))
        return next((c for c in SENTINELS if c not in used), None)

    def _locate(self, full: str, messages, tools, k: int, not_before: int, line, where,
                s: str | None = None):
        msg = messages[k]
        if not isinstance(msg.get("content"), str):
            raise self._refuse(line, f"assistant turn {k + 1} has no text content", where)
        s = s or self._sentinel(full, messages)  # (the caller's, found once per record)
        if s is None:
            raise self._refuse(line, "the record contains every private-use marker character", where)
        # a tool-call turn is probed as a plain answer: what differs is the call as rendered
        probe_msg = {key: v for key, v in msg.items() if key not in TOOL_CALL_KEYS}
        probe_msg["content"] = s
        probe = [*messages[:k], probe_msg, *messages[k + 1:]]
        try:
            if is_tool_call(msg) and self.render([*messages[:k], {**msg, "tool_calls": None,
                                                                  "function_call": None},
                                                  *messages[k + 1:]], tools=tools) == full:
                raise self._refuse(line, f"assistant turn {k + 1} is a tool call and this "
                                   "template does not render tool calls", where)
            other = self.render(probe, tools=tools)
        except ChatRenderError:
            raise
        except Exception as exc:
            if is_tool_call(msg):  # a template that checks roles skipping tool calls (Mistral)
                return self._locate_by_prefix(full, messages, tools, k, not_before, line, where)
            raise self._refuse(line, f"{exc.__class__.__name__}: {exc}", where) from None
        # 1. the content as rendered: where F and the sentinel rendering disagree
        a = _lcp(full, other)
        q = _lcs(full, other, min(len(full), len(other)) - a)
        b = len(full) - q
        if other.count(s) != 1 or other.index(s) + 1 != len(other) - q:
            raise self._refuse(line, f"assistant turn {k + 1} is not rendered once, in one place, "
                               "so its trained span cannot be located", where)
        # 2. the start: where F leaves the prompt the model is given for this turn
        start = a
        if k:
            try:
                before = self.render(messages[:k], tools=tools)
                prompt = self.render(messages[:k], generation_prompt=True, tools=tools)
            except Exception:  # a template that cannot render the bare prefix: the content start stands
                before = prompt = None
            if before is not None and full.startswith(before) and prompt.startswith(before):
                start = max(len(before), min(a, _lcp(full, prompt, len(before))))
        # 3. the end: the template's own end-of-turn marker after the content (the last
        #    turn's probe is this very conversation: rendered once)
        try:
            alone = other if k == len(messages) - 1 else self.render([*messages[:k], probe_msg], tools=tools)
        except Exception as exc:
            raise self._refuse(line, f"{exc.__class__.__name__}: {exc}", where) from None
        tail = alone[alone.index(s) + 1:] if alone.count(s) == 1 else ""
        # (a space before it is the marker's: Llama-2 ends a turn with " </s>")
        marker = (re.match(r"[ \t]*\S+", tail) or re.match("", tail)).group(0)
        if marker and not full.startswith(marker, b):
            raise self._refuse(line, f"assistant turn {k + 1} does not end with the template's "
                               f"end-of-turn marker {marker!r}", where)
        if start < not_before:
            raise self._refuse(line, f"assistant turn {k + 1} overlaps the turn before it", where)
        return start, b + len(marker), marker

    def _locate_by_prefix(self, full: str, messages, tools, k: int, not_before: int, line, where):
        """A tool-call turn a template will not render as a plain answer: the conversation
        up to it must render as a prefix of F; the turn is what that prefix adds to the
        generation prompt, up to its last non-space character (the end-of-turn marker)."""
        try:
            upto = self.render(messages[:k + 1], tools=tools).rstrip()
            prompt = self.render(messages[:k], generation_prompt=True, tools=tools)
        except Exception as exc:
            raise self._refuse(line, f"{exc.__class__.__name__}: {exc}", where) from None
        start = _lcp(upto, prompt)
        if not full.startswith(upto) or start < not_before or start >= len(upto):
            raise self._refuse(line, f"assistant turn {k + 1} (a tool call) cannot be located: "
                               "the template renders the conversation before it differently "
                               "once later turns follow", where)
        return start, len(upto), re.search(r"\S*$", upto).group(0)


def label_pieces(pieces, tokens, starts, *, all_trained: bool = False) -> list[int]:
    """Labels for `tokens` (ids) whose first characters are at `starts` in the joined pieces
    (each token reaching to the next one's start): the id where the token covers a character
    of a trained piece, else -100. A token that begins in the prompt and runs into the answer
    (" Four" after a prompt ending "Assistant: ") is the answer's first token: labelled by
    its first character alone, the first word of every answer went untrained."""
    bounds, flags, pos = [], [], 0
    for text, trained in pieces:
        bounds.append(pos)
        flags.append(bool(trained))
        pos += len(text)
    labels = []
    ends = [*starts[1:], pos]
    for tok, st, end in zip(tokens, starts, ends):
        i = max(0, bisect.bisect_right(bounds, st) - 1)
        j = bisect.bisect_right(bounds, max(st, end - 1)) - 1
        labels.append(tok if all_trained or any(flags[i:j + 1]) else -100)
    return labels
