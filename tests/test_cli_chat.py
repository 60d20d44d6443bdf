"""`herd chat` and `herd run` as a user sees them: a scripted terminal session on a pseudo-terminal."""

import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import llamaherd
from llamaherd.config import ModelConfig
from llamaherd.engine.generate import greedy_reference

from .conftest import random_model

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]")


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> Path:
    """A Meta checkpoint folder: params.json + consolidated.00.pth + the official Llama 3 tokenizer.model."""
    from llamaherd.checkpoint.base import Checkpoint
    from llamaherd.checkpoint.meta_pth import write
    from llamaherd.tokenizer import Tokenizer

    tok = Tokenizer.llama3()
    config = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=tok.vocab_size, multiple_of=32,
                         rope_theta=5e5, max_seq_len=256, tie_embeddings=True)
    net = random_model(config, std=0.5, seed=2)
    dst = tmp_path_factory.mktemp("tiny-llama3")
    write(Checkpoint(config, net.state_dict(), Path(tok.source).parent, tokenizer=tok), dst)
    return dst


class Terminal:
    """A child process on a pseudo-terminal that is its controlling terminal (so Ctrl+C is a real SIGINT):
    send keys, wait for text on the screen."""

    def __init__(self, argv: list[str], env: dict[str, str]) -> None:
        self.pid, self.master = pty.fork()
        if self.pid == 0:  # the child: exec the command on the terminal
            try:
                # As a login shell starts it: Ctrl+C at its default. A suite started in the background by a
                # non-interactive shell inherits SIGINT ignored, and an ignored SIGINT survives exec.
                signal.signal(signal.SIGINT, signal.SIG_DFL)
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        self.status: int | None = None
        self.screen = ""  # everything shown so far, escapes stripped, line ends normalised
        self.mark = 0

    def alive(self) -> bool:
        if self.status is None:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                self.status = os.waitstatus_to_exitcode(status)
        return self.status is None

    def _pump(self, timeout: float) -> None:
        ready, _, _ = select.select([self.master], [], [], timeout)
        if ready:
            try:
                data = os.read(self.master, 65536)
            except OSError:  # EIO: the child closed the terminal
                data = b""
            if not data:
                raise EOFError
            self.screen += ANSI.sub("", data.decode("utf-8", "replace")).replace("\r", "")

    def expect(self, text: str, timeout: float = 180.0) -> str:
        """Wait until `text` appears after the last match; return what came before it."""
        end = time.monotonic() + timeout
        while True:
            at = self.screen.find(text, self.mark)
            if at >= 0:
                before = self.screen[self.mark : at]
                self.mark = at + len(text)
                return before
            if time.monotonic() > end:
                raise AssertionError(f"timed out waiting for {text!r}; screen so far:\n{self.screen}")
            try:
                self._pump(0.2)
            except EOFError:
                raise AssertionError(f"process exited waiting for {text!r}; screen:\n{self.screen}") from None

    def expect_output(self, n: int, timeout: float = 120.0) -> None:
        """Wait until at least n more characters are on the screen."""
        end = time.monotonic() + timeout
        while len(self.screen) - self.mark < n:
            assert time.monotonic() < end, f"no output; screen:\n{self.screen}"
            self._pump(0.2)
        self.mark = len(self.screen)

    def send(self, keys: str) -> None:
        os.write(self.master, keys.encode())

    def wait(self, timeout: float = 60.0) -> int:
        end = time.monotonic() + timeout
        while self.alive() and time.monotonic() < end:
            try:
                self._pump(0.2)
            except EOFError:
                break
        while self.alive() and time.monotonic() < end:
            time.sleep(0.1)
        assert self.status is not None, f"still running; screen:\n{self.screen}"
        return self.status

    def close(self) -> None:
        if self.alive():
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        os.close(self.master)


def herd(*args: str, home: Path) -> Terminal:
    env = dict(os.environ, LLAMAHERD_HOME=str(home), TERM="dumb", PYTHONUNBUFFERED="1")
    return Terminal([sys.executable, "-m", "llamaherd", *args], env)


def expected_reply(model, messages, n: int) -> str:
    """The greedy reply computed without the engine: the chat format's prompt ids, a full forward per token
    (no cache), cut at the first end-of-turn token, decoded by the tokenizer in one piece."""
    fmt = model.chat_format()
    ids = fmt.encode_dialog(messages)
    out = greedy_reference(model.net, ids, n)
    stops = set(fmt.stop_ids) | set(model.tokenizer.stop_ids)
    cut = next((i for i, t in enumerate(out) if t in stops), len(out))
    return model.tokenizer.decode(out[:cut]).replace("\r", "")


def test_scripted_chat_session(tiny_folder, tmp_path):
    model = llamaherd.load(tiny_folder)
    t = herd("chat", str(tiny_folder), "--temperature", "0", "--max-tokens", "8", home=tmp_path)
    try:
        t.expect(">>> ")
        t.send("Hello\r")
        t.expect("Hello\n")  # the terminal echoes what was typed
        first = expected_reply(model, [{"role": "user", "content": "Hello"}], 8)
        assert first.strip(), "the greedy reply should not be empty for this seed"
        shown = t.expect(">>> ")
        assert shown.strip("\n") == first.strip("\n")

        t.send("/set parameter num_predict 3\r")
        t.expect("Set parameter 'num_predict' to '3'")
        t.expect(">>> ")
        t.send("/set parameter temperature hot\r")
        t.expect("needs a number")
        t.expect(">>> ")

        t.send("/set verbose\r")
        t.expect("Set 'verbose' mode.")
        t.expect(">>> ")
        t.send('"""Two\r')
        t.expect("... ")
        t.send('lines"""\r')
        history = [{"role": "user", "content": "Hello"}, {"role": "assistant", "content": first},
                   {"role": "user", "content": "Two\nlines"}]
        second = expected_reply(model, history, 3)
        shown = t.expect("total duration:")
        assert shown.strip("\n").endswith(second.strip("\n"))
        stats = t.expect(">>> ")  # Ollama's --verbose block
        for label in ("load duration:", "prompt eval count:", "prompt eval rate:", "eval count:", "eval rate:"):
            assert label in stats
        assert re.search(r"eval rate:\s+[\d.]+ tokens/s", stats)

        t.send("/show info\r")
        info = t.expect(">>> ")
        assert "context length      256" in info and "chat format         llama3" in info

        t.send("/bye\r")
        assert t.wait() == 0
    finally:
        t.close()


def interrupt(t: Terminal, then: str, wait: float = 20.0, presses: int = 4) -> None:
    """Press Ctrl+C until `then` appears (each press waits `wait` s for it): on a loaded machine a SIGINT can
    land where the child notices it only at the next keypress, and a second press is what a person would do."""
    for press in range(presses):
        t.send("\x03")
        try:
            t.expect(then, timeout=wait)
            return
        except AssertionError:
            if press == presses - 1 or not t.alive():
                raise


def test_ctrl_c_stops_a_reply_and_ctrl_d_leaves(tiny_folder, tmp_path):
    # No token limit: a random model's reply runs until the context window fills, long enough to interrupt.
    t = herd("chat", str(tiny_folder), "--max-tokens", "-1", "--seed", "1", home=tmp_path)
    try:
        t.expect(">>> ")
        t.send("Talk\r")
        t.expect("Talk\n")
        t.expect_output(3)  # part of the reply is on screen
        interrupt(t, ">>> ")  # Ctrl+C during the reply: back at the prompt
        assert t.alive(), "Ctrl+C during a reply must not end the session"
        # Let input() reach readline's wait first: a SIGINT landing between the prompt being written and
        # CPython's readline starting its select() is only noticed at the next keypress (a CPython race,
        # seen under heavy load); a person typing cannot press that fast. `interrupt` presses again if so.
        time.sleep(0.5)
        interrupt(t, "Use Ctrl + d or /bye to exit.")  # Ctrl+C at the prompt only explains how to leave
        t.expect(">>> ")
        t.send("\x04")  # Ctrl+D
        assert t.wait() == 0
    finally:
        t.close()


def test_run_with_prompt_and_piped_stdin(tiny_folder, tmp_path):
    model = llamaherd.load(tiny_folder)
    expect = expected_reply(model, [{"role": "user", "content": "Hi there"}], 5)
    env = dict(os.environ, LLAMAHERD_HOME=str(tmp_path))
    cmd = [sys.executable, "-m", "llamaherd", "run", str(tiny_folder), "--temperature", "0", "--max-tokens", "5"]
    got = subprocess.run(cmd + ["Hi there"], capture_output=True, text=True, env=env, timeout=300)
    assert got.returncode == 0, got.stderr
    assert got.stdout.replace("\r", "").strip("\n") == expect.strip("\n")
    assert "loading" in got.stderr  # a plain progress line, not a spinner, when not on a terminal
    piped = subprocess.run(cmd, input="Hi there", capture_output=True, text=True, env=env, timeout=300)
    assert piped.stdout == got.stdout


def test_errors_are_one_line(tmp_path):
    env = dict(os.environ, LLAMAHERD_HOME=str(tmp_path))
    got = subprocess.run([sys.executable, "-m", "llamaherd", "chat", str(tmp_path / "nope")], capture_output=True,
                         text=True, env=env, timeout=120)
    assert got.returncode == 1
    assert got.stderr.strip().count("\n") == 0 and got.stderr.startswith("herd: error:")
    assert "Traceback" not in got.stderr
