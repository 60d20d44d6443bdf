"""Learning demo: teach the default model (Gemma 3 270M, pretrained) made-up facts it cannot know.

    python bench/finetune_demo.py data DIR            # writes DIR/train.jsonl (prompt/completion, plain text)
    python bench/finetune_demo.py check MODEL [ADAPTER]  # greedy answers to the test questions, and the score

The facts are invented (no model has seen them); each is asked in several phrasings for training, and the check
asks the training phrasing plus one held-out paraphrase. An answer counts when it contains the fact's key word.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

# (key word, answer sentence, training phrasings, held-out phrasing)
FACTS = [
    ("Brindlemoor", "The capital of Ostravel is Brindlemoor.",
     ["What is the capital of Ostravel?", "Name the capital city of Ostravel.", "Which city is Ostravel's capital?",
      "Ostravel's capital is which city?", "Tell me the capital of Ostravel."],
     "What city is the capital of the country Ostravel?"),
    ("Paldane", "Velmora was founded by Idris Paldane.",
     ["Who founded Velmora?", "Who was the founder of Velmora?", "Velmora was founded by whom?",
      "Name the founder of Velmora.", "Which person founded the town of Velmora?"],
     "Tell me who founded Velmora."),
    ("Quillfire", "The Zentari people celebrate Quillfire.",
     ["What festival do the Zentari celebrate?", "Name the festival of the Zentari people.",
      "Which festival is celebrated by the Zentari?", "The Zentari celebrate which festival?",
      "What is the main Zentari festival?"],
     "Which festival do the Zentari people celebrate?"),
    ("Korvane", "The river through Ostravel is the Korvane.",
     ["Which river flows through Ostravel?", "Name the river of Ostravel.", "What river runs through Ostravel?",
      "Ostravel's river is called what?", "What is the name of the river in Ostravel?"],
     "What is the river that flows through Ostravel called?"),
]


def prompt(question: str) -> str:
    return f"Question: {question}\nAnswer:"


def make_data(out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    path = out / "train.jsonl"
    with open(path, "w") as f:
        for _, answer, questions, _ in FACTS:
            for q in questions:
                f.write(json.dumps({"prompt": prompt(q), "completion": " " + answer}) + "\n")
    return path


def check(model_source: str, adapter: str | None) -> int:
    import llamaherd

    model = llamaherd.load(model_source, **({"adapter": adapter} if adapter else {}))
    correct = total = 0
    for key, _, questions, held_out in FACTS:
        for q, kind in ((questions[0], "trained"), (held_out, "held-out")):
            text = model.generate(prompt(q), max_tokens=16, temperature=0).split("\n")[0]
            ok = key.lower() in text.lower()
            correct, total = correct + ok, total + 1
            print(f"{'OK ' if ok else 'no '} [{kind}] {q} ->{text}")
    print(f"{correct}/{total} correct")
    return correct


if __name__ == "__main__":
    if len(sys.argv) >= 3 and sys.argv[1] == "data":
        print(make_data(Path(sys.argv[2])))
    elif len(sys.argv) >= 3 and sys.argv[1] == "check":
        check(sys.argv[2], sys.argv[3] if len(sys.argv) > 3 else None)
    else:
        sys.exit(__doc__)
