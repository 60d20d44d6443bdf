"""The interactive chat loop behind `herd chat` and `herd run MODEL`: Ollama's prompt, commands and keys.

`>>> ` prompt with readline editing and history; `\"\"\"` opens and closes multi-line input; `/set`, `/show`,
`/clear`, `/bye`, `/?`. Ctrl+C stops a reply and keeps the session, Ctrl+D leaves.
"""

from __future__ import annotations

import dataclasses
import shlex
import sys
from pathlib import Path
from typing import Any, TextIO

from ..engine.sampling import SamplingParams
from ..engine.stats import GenerationStats
from ..errors import LlamaherdError

HELP = """Available Commands:
  /set            Set session variables
  /show           Show model information
  /clear          Clear session context
  /bye            Exit
  /?, /help       Help for a command

Use \"\"\" to begin a multi-line message.
"""

SET_HELP = """Available Commands:
  /set parameter ...     Set a parameter
  /set system <string>   Set system message
  /set verbose           Show LLM stats
  /set quiet             Disable LLM stats
"""

SHOW_HELP = """Available Commands:
  /show info         Show details for this model
  /show parameters   Show parameters for this model
  /show system       Show system message
  /show template     Show the chat format / prompt template
"""

PARAMETER_HELP = """Available Parameters:
  /set parameter seed <int>             Random number seed
  /set parameter num_predict <int>      Max number of tokens to predict (-1 = no limit)
  /set parameter top_k <int>            Pick from top k num of tokens
  /set parameter top_p <float>          Pick token based on sum of probabilities
  /set parameter min_p <float>          Pick token based on top token probability * min_p
  /set parameter typical_p <float>      Locally typical sampling mass
  /set parameter num_ctx <int>          Set the context size
  /set parameter temperature <float>    Set creativity level
  /set parameter repeat_penalty <float> How strongly to penalize repetitions
  /set parameter repeat_last_n <int>    Set how far back to look for repetitions
  /set parameter presence_penalty <float>
  /set parameter frequency_penalty <float>
  /set parameter stop <string> <string> ...   Set the stop parameters
"""

# Ollama's parameter names -> ours (SamplingParams fields, plus num_ctx which is the model's window).
PARAM_ALIASES = {"num_predict": "max_tokens", "repeat_penalty": "repetition_penalty", "repeat_last_n": "penalty_last_n"}
_FIELD_TYPES = {f.name: f.type for f in dataclasses.fields(SamplingParams)}


def parse_parameter(name: str, values: list[str]) -> tuple[str, Any]:
    """`/set parameter NAME VALUE...` -> (our field name, typed value); bad input raises ValueError with a fix."""
    field = PARAM_ALIASES.get(name, name)
    if field == "num_ctx":
        kind = "int"
    elif field in _FIELD_TYPES and field not in ("logit_bias", "logprobs", "top_logprobs", "ignore_eos"):
        kind = str(_FIELD_TYPES[field])
    else:
        raise ValueError(f"Unknown parameter '{name}'. Type /set parameter for the list.")
    if not values:
        raise ValueError(f"Usage: /set parameter {name} <value>")
    if field in ("stop", "stop_token_ids"):
        return field, tuple(values) if field == "stop" else tuple(int(v) for v in values)
    raw = values[0]
    try:
        if "int" in kind and "float" not in kind:
            value: Any = int(raw)
        else:
            value = float(raw)
    except ValueError:
        raise ValueError(f"Couldn't set parameter: {name} needs a number, got '{raw}'") from None
    if field in ("max_tokens", "penalty_last_n") and value == -1:
        value = None
    return field, value


class ChatSession:
    """One conversation with a loaded model on a terminal (or any pair of text streams)."""

    def __init__(self, model, sampling: dict[str, Any] | None = None, *, system: str | None = None,
                 verbose: bool = False, load_seconds: float = 0.0, name: str = "",
                 stdin: TextIO | None = None, stdout: TextIO | None = None) -> None:
        self.model = model
        self.name = name
        self.sampling: dict[str, Any] = dict(sampling or {})
        self.system = system
        self.verbose = verbose
        self.load_seconds = load_seconds
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.messages: list[dict] = []
        self.interactive = self.stdin.isatty()
        if self.interactive:
            _setup_readline()

    # -- the loop ----------------------------------------------------------------------------------------------

    def run(self) -> int:
        while True:
            try:
                line = self.read_message()
            except KeyboardInterrupt:
                self.say("\nUse Ctrl + d or /bye to exit.")
                continue
            if line is None:  # Ctrl+D / end of input
                if self.interactive:
                    self.say("")
                return 0
            if not line.strip():
                continue
            if line.lstrip().startswith("/"):
                if not self.command(line.strip()):
                    return 0
                continue
            self.reply(line)

    def read_message(self) -> str | None:
        line = self._read(">>> ")
        if line is None:
            return None
        if not line.lstrip().startswith('"""'):
            return line
        # Multi-line: everything up to a line ending in """ (Ollama's rule).
        first = line.lstrip()[3:]
        if first.rstrip().endswith('"""'):
            return first.rstrip()[:-3]
        lines = [first] if first else []
        while True:
            more = self._read("... ")
            if more is None:
                return "\n".join(lines)
            if more.rstrip().endswith('"""'):
                lines.append(more.rstrip()[:-3])
                return "\n".join(lines).strip("\n")
            lines.append(more)

    def _read(self, prompt: str) -> str | None:
        try:
            if self.interactive and self.stdin is sys.stdin:
                return input(prompt)  # readline: editing and history
            if self.interactive:
                self.stdout.write(prompt)
                self.stdout.flush()
            line = self.stdin.readline()
            return line.rstrip("\n") if line else None
        except EOFError:
            return None

    def say(self, text: str = "") -> None:
        self.stdout.write(text + "\n")
        self.stdout.flush()

    # -- a turn --------------------------------------------------------------------------------------------------

    def conversation(self, user_text: str) -> list[dict]:
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + self.messages + [{"role": "user", "content": self.user_content(user_text)}]

    def user_content(self, user_text: str):
        """For a vision model, image file paths typed in the line are attached as images (as Ollama does)."""
        if getattr(self.model.config, "vision", None) is None:
            return user_text
        from ..vision_inputs import user_content

        return user_content(user_text)

    def reply(self, user_text: str) -> str | None:
        stats = GenerationStats(load_seconds=self.load_seconds)
        self.load_seconds = 0.0  # counted once, on the first reply
        pieces = None
        text: list[str] = []
        try:
            # Like Ollama, a reply runs until the model ends its turn unless num_predict says otherwise.
            sampling = {"max_tokens": None, **self.sampling}
            pieces = self.model.chat(self.conversation(user_text), stream=True, stats=stats, **sampling)
            for piece in pieces:
                self.stdout.write(piece)
                self.stdout.flush()
                text.append(piece)
        except KeyboardInterrupt:
            if pieces is not None:
                pieces.close()
            self.say("\n")
            return None  # the interrupted turn is dropped from the conversation
        except LlamaherdError as exc:
            self.say(f"Error: {exc}")
            return None
        reply = "".join(text)
        self.messages += [{"role": "user", "content": self.user_content(user_text)},
                          {"role": "assistant", "content": reply}]
        self.say("\n")
        if self.verbose:
            self.say(stats.format() + "\n")
        return reply

    # -- commands ------------------------------------------------------------------------------------------------

    def command(self, line: str) -> bool:
        """Run one /command; False means leave."""
        try:
            words = shlex.split(line)
        except ValueError:
            words = line.split()
        cmd, args = words[0], words[1:]
        if cmd in ("/bye", "/exit"):
            return False
        if cmd in ("/?", "/help"):
            topic = args[0] if args else ""
            self.say({"set": SET_HELP, "/set": SET_HELP, "show": SHOW_HELP, "/show": SHOW_HELP}.get(topic, HELP))
        elif cmd == "/clear":
            self.messages.clear()
            self.say("Cleared session context")
        elif cmd == "/set":
            self.cmd_set(line, args)
        elif cmd == "/show":
            self.cmd_show(args)
        else:
            self.say(f"Unknown command '{cmd}'. Type /? for help")
        return True

    def cmd_set(self, line: str, args: list[str]) -> None:
        if not args:
            self.say(SET_HELP)
        elif args[0] == "parameter":
            if len(args) < 2:
                self.say(PARAMETER_HELP)
                return
            try:
                field, value = parse_parameter(args[1], args[2:])
                trial = dict(self.sampling, **{field: value})
                num_ctx = trial.pop("num_ctx", None)
                self.model.sampling_params(**trial)  # validate now, not at the next reply
                self.model.context_limit(num_ctx)
            except (ValueError, LlamaherdError) as exc:
                self.say(str(exc))
                return
            self.sampling[field] = value
            shown = ", ".join(args[2:])
            self.say(f"Set parameter '{args[1]}' to '{shown}'")
        elif args[0] == "system":
            text = line.split("system", 1)[1].strip()
            if text.startswith('"""') and text.endswith('"""') and len(text) >= 6:
                text = text[3:-3]
            self.system = text or None
            self.say("Set system message.")
        elif args[0] == "verbose":
            self.verbose = True
            self.say("Set 'verbose' mode.")
        elif args[0] == "quiet":
            self.verbose = False
            self.say("Set 'quiet' mode.")
        else:
            self.say(f"Unknown command '/set {args[0]}'. Type /? for help")

    def cmd_show(self, args: list[str]) -> None:
        what = args[0] if args else ""
        m = self.model
        if what == "info":
            c = m.config
            n = sum(p.numel() for p in m.net.parameters())
            rows = [("architecture", c.arch), ("parameters", _human(n)), ("context length", c.max_seq_len),
                    ("embedding length", c.dim), ("layers", c.n_layers), ("vocabulary", c.vocab_size)]
            fmt = _safe(lambda: m.chat_format_name)
            if fmt:
                rows.append(("chat format", fmt))
            self.say("  Model\n" + "\n".join(f"    {k:<20}{v}" for k, v in rows) + "\n")
        elif what == "parameters":
            user = "\n".join(f"{k:<20}{_fmt(v)}" for k, v in sorted(self.sampling.items()))
            self.say("User defined parameters:\n" + (user or "(none)") + "\n")
            d = m.generation_defaults
            model_rows = [(k, getattr(d, k)) for k in ("temperature", "top_p", "top_k") if getattr(d, k) is not None]
            if model_rows:
                self.say("Model defined parameters:\n" + "\n".join(f"{k:<20}{v}" for k, v in model_rows) + "\n")
        elif what == "system":
            self.say(self.system or "No system message was specified for this model.")
        elif what == "template":
            self.say(self.template_text())
        else:
            self.say(SHOW_HELP)

    def template_text(self) -> str:
        template = self.model.checkpoint.chat_template
        name = _safe(lambda: self.model.chat_format_name)
        if name is None:
            return "This model has no chat format; herd run MODEL PROMPT completes raw text."
        if name == "hf" and template:
            return template
        sample = [{"role": "system", "content": "{{ system }}"}, {"role": "user", "content": "{{ prompt }}"}]
        rendered = _safe(lambda: self.model.chat_format().render(sample, add_generation_prompt=True))
        return f"chat format: {name}\n{rendered}" if rendered else f"chat format: {name}"


def _setup_readline() -> None:
    try:
        import atexit
        import readline
    except ImportError:  # no readline on this platform: plain input() still works
        return
    try:
        from ..store import home

        hist = Path(home()) / "history"
    except Exception:  # the store is optional here; history is a convenience
        hist = Path.home() / ".cache" / "llamaherd" / "history"
    try:
        hist.parent.mkdir(parents=True, exist_ok=True)
        if hist.exists():
            readline.read_history_file(hist)
        readline.set_history_length(1000)
        atexit.register(readline.write_history_file, hist)
    except OSError:
        pass


def _safe(fn):
    try:
        return fn()
    except Exception:  # /show must never end the session
        return None


def _human(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.2f}M"


def _fmt(v: Any) -> str:
    if isinstance(v, tuple):
        return " ".join(repr(x) for x in v)
    return "-1" if v is None else str(v)
