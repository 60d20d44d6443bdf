"""Long fuzz run of the GGUF reader: mutated tiny GGUF files through header parsing, config and tokenizer.

Usage: .venv/bin/python tests/fuzz/fuzz_gguf_header.py [N] [SEED]
Each input is a valid tiny Llama GGUF (Q8_0, with an SPM vocabulary) after 1-6 random byte edits
(overwrite / insert / delete / truncate), biased to the header. The contract: `llamaherd.checkpoint.gguf.read`
returns a Checkpoint or raises a LlamaherdError; any other exception, a MemoryError under the 2 GiB address-
space limit set here, or a hang is a crash. Prints how many inputs were tried and how each ended.
"""

from __future__ import annotations

import collections
import random
import resource
import sys
import tempfile
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import gguf  # noqa: E402
from gguf import GGMLQuantizationType as QT  # noqa: E402

from llamaherd import gguf_file  # noqa: E402
from llamaherd.checkpoint import gguf as reader  # noqa: E402
from llamaherd.errors import LlamaherdError  # noqa: E402
from tests.conftest import TINY, random_model  # noqa: E402
from tests.gguf_read_fixtures import write_llama_gguf  # noqa: E402


def main(n: int = 100_000, seed: int = 0) -> int:
    rng = random.Random(seed)
    tmp = Path(tempfile.mkdtemp())
    c = TINY["llama3"]
    vocab = {"tokenizer.ggml.model": ("llama", gguf.GGUFValueType.STRING),
             "tokenizer.ggml.tokens": ([f"t{i}" for i in range(c.vocab_size)], gguf.GGUFValueType.ARRAY),
             "tokenizer.ggml.scores": ([float(-i) for i in range(c.vocab_size)], gguf.GGUFValueType.ARRAY)}
    src = tmp / "tiny.gguf"
    write_llama_gguf(src, c, random_model(c).state_dict(), QT.Q8_0, vocab=vocab)
    blob = src.read_bytes()
    header_end = gguf_file.parse_header(blob).data_offset
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
    outcomes: collections.Counter[str] = collections.Counter()
    crashes = 0
    path = tmp / "mutant.gguf"
    t0 = time.time()
    for i in range(n):
        out = bytearray(blob)
        for _ in range(rng.randint(1, 6)):
            limit = header_end if rng.random() < 0.9 else len(out)
            pos = rng.randrange(max(1, min(limit, len(out))))
            kind = rng.randrange(4) if rng.random() < 0.97 else 3
            if kind == 0 and out:
                out[pos] = rng.randrange(256) if rng.random() < 0.7 else rng.choice((0, 0xFF, 0x7F, 0x80))
            elif kind == 1:
                out.insert(pos, rng.randrange(256))
            elif kind == 2 and out:
                del out[pos]
            elif kind == 3:
                del out[pos:]
        path.write_bytes(bytes(out))
        try:
            reader.read(path)
            outcomes["read ok"] += 1
        except LlamaherdError as e:
            outcomes[type(e).__name__] += 1
        except Exception:  # noqa: BLE001 - anything else is the bug this run looks for
            crashes += 1
            outcomes["CRASH"] += 1
            if crashes <= 5:
                (tmp / f"crash{i}.gguf").write_bytes(bytes(out))
                traceback.print_exc()
        if (i + 1) % 10_000 == 0:
            print(f"{i + 1} inputs, {time.time() - t0:.0f} s, {dict(outcomes)}", flush=True)
    print(f"tried {n} inputs in {time.time() - t0:.0f} s: {dict(outcomes)}; crashes: {crashes}")
    return 1 if crashes else 0


if __name__ == "__main__":
    sys.exit(main(*(int(a) for a in sys.argv[1:3])))
