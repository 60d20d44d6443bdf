"""Shared test corpus for the tokenizer tests: text chosen to hit every pre-tokenizer and splitting edge."""

from __future__ import annotations

import json

PROSE = (
    "The quick brown fox jumps over the lazy dog. It's 3:45 p.m., and we'd better hurry -- "
    "\"quoted\" text, (parenthesised) [bracketed] {braced}; semicolons: colons! Question? Ellipsis... "
)
CODE = '''def fib(n: int) -> int:
    """Return the n-th Fibonacci number."""
\tif n < 2:
\t\treturn n
    return fib(n - 1) + fib(n - 2)  # recursion!

#include <stdio.h>
int main(void) { printf("%d\\n", 42); return 0; }
'''
JSON_TEXT = json.dumps(
    {"name": "get_weather", "arguments": {"city": "Zürich", "days": [1, 2, 3], "ok": True, "none": None}},
    indent=2,
)
CJK = "我爱自然语言处理。日本語のテキストも、ひらがなとカタカナを含みます。한국어 문장도 있습니다."
ARABIC = "مرحبا بالعالم! هذه جملة عربية مع أرقام ١٢٣٤٥ وعلامات ترقيم؟"
HINDI = "नमस्ते दुनिया। यह एक हिंदी वाक्य है, जिसमें संयुक्ताक्षर क्षत्रज्ञ हैं।"
EMOJI = "Family: 👨‍👩‍👧‍👦, flags 🇨🇭🇯🇵, skin tones 👍🏽👋🏿, heart ❤️‍🔥, keycap 1️⃣ and 🤖🦙!"
COMBINING = "e\u0301 a\u0308 n\u0303 Z\u0351\u0362\u0334a\u0317l\u0327g\u0300o\u0361 \u1100\u1161\u11a8 e\u0301\u0301\u0301"
WHITESPACE = "a" + " " * 37 + "b\t\t\t\tc\n\n\n\n\nd \r\n \r\n e   \n\t \n  f\u00a0\u2003g\u3000h   "
DIGITS = "1234567890" * 7 + " 3.14159265358979 1,000,000 007 ٣٤٥ 12345678901234567890"
CONTRACTIONS = "I'LL go, We'Re here, they'VE, she'S, it'd, DON'T, you'Ll, I'm, WE'D, o'clock, '''s"
SPECIAL_LITERALS = (
    "user wrote <|begin_of_text|><|start_header_id|>system<|end_header_id|> then <|eot_id|><|eom_id|>"
    " and <|python_tag|> <|header_start|>x<|header_end|> <|eot|> <|eom|> <|image|> <|reserved_special_token_3|>"
    " <s> </s> [INST] <<SYS>> <unk> <pad> <|endoftext|>"
)
MIXED_SCRIPTS = "Ｆｕｌｌｗｉｄｔｈ ﬁ ligature ǅ titlecase ÀÉÎÕÜ àéîõü ß ΣΑΣ σας İstanbul ıi"

CORPUS = {
    "empty": "",
    "space": " ",
    "prose": PROSE,
    "code": CODE,
    "json": JSON_TEXT,
    "cjk": CJK,
    "arabic": ARABIC,
    "hindi": HINDI,
    "emoji": EMOJI,
    "combining": COMBINING,
    "whitespace": WHITESPACE,
    "digits": DIGITS,
    "contractions": CONTRACTIONS,
    "special_literals": SPECIAL_LITERALS,
    "mixed_scripts": MIXED_SCRIPTS,
    "all": PROSE + CODE + JSON_TEXT + CJK + ARABIC + HINDI + EMOJI + COMBINING + WHITESPACE + DIGITS + CONTRACTIONS,
    "space_run_lf": "\n" * 3000 + " " * 5000 + "\t" * 2000 + "end",
}

# Not valid Unicode text: encode must not raise, but decode cannot give the input back.
LONE_SURROGATES = {
    "high": "before \ud800 after",
    "low": "x\udfffy",
    "pair_split": "\ud83d \ude00",
    "many": "\ud800" * 20 + "text",
}

# Inputs long enough to trigger Meta's 25,000-character run cuts and 400,000-character pieces.
LONG_RUNS = {
    "letters_60k": "x" * 60_001,
    "spaces_50k": "a" + " " * 50_001 + "b",
    "digits_30k": "7" * 30_000,
    "cjk_26k": "字" * 26_000 + " end",
    "newlines_27k": "\n" * 27_000 + "tail",
    "emoji_26k": "😀" * 26_000,
    "mixed_runs": ("ab" * 13_000 + " " * 25_001 + "c" * 25_000 + "\t" * 24_999 + "z") * 2,
    # A long run that straddles the 400,000-character piece boundary.
    "straddle_400k": "word " * 79_000 + "q" * 40_000 + " tail",
}
